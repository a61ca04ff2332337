"""The one record schema that walks through every stage.

A sample is identified by `sample_id` (a content hash of its original pair) and keeps its
`source_index` (row number in the input file). Each stage adds columns; the tables below say
which columns a stage needs and which it adds, and `check_columns` enforces them at every
stage boundary so a stage never runs on a table it does not understand.
"""

from __future__ import annotations

import hashlib
import json

import polars as pl

from reflectune import io, variants
from reflectune.errors import SchemaError

# Written into every Parquet file's metadata under SCHEMA_KEY; a file of another version is
# refused where it is read (`read`), never misread. v3: versions in the files, the score,
# decision and selected tables declared here.
SCHEMA_VERSION = 3
SCHEMA_KEY = "reflectune.schema_version"

# The pair every stage carries. `input` is "" when the pair has none.
RECORD: dict[str, pl.DataType] = {
    "sample_id": pl.String,
    "source_index": pl.Int64,
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
}

# An input row that did not become a record, and why.
REJECTED: dict[str, pl.DataType] = {
    "source_index": pl.Int64,
    "sample_id": pl.String,
    "reason": pl.String,
    "raw": pl.String,
}

# A teacher variant of a sample (docs/method.md: ins, res, ins_res), with everything the teacher
# wrote: the raw text of every attempt, how parsing went, and what it cost.
VARIANTS = variants.NAMES
# ok: usable, every field what it promises. The rest fell back to the base pair, each for its
# reason (reflectune.checks, reflection.screen): cut (the token limit cut a field, or it stops
# where its content should begin), degenerate (a loop, or a copy of the original), fragment (a new instruction that is
# a piece of the analysis), review (an answer that reviews an answer), script (letters of a
# script the pair neither has nor asks for), verify (the teacher, asked with teacher.verify,
# did not answer that it is a complete answer), fallback (no usable form). partial: the released
# code's field-by-field fallback, which the pipeline no longer makes (kept to read older runs).
PARSE_STATUSES = ("ok", "cut", "degenerate", "fragment", "review", "script", "verify", "fallback", "partial")
VARIANT: dict[str, pl.DataType] = RECORD | {
    "variant": pl.String,
    "raw_text": pl.List(pl.String),
    # per attempt, how the output format was enforced: regex, json_schema or none
    "constrained": pl.List(pl.String),
    # one of PARSE_STATUSES; the fields of a variant that is not ok are its base pair's
    "parse_status": pl.String,
    "parse_detail": pl.String,
    "prompt_version": pl.String,
    "teacher": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
}

# Student scores of one pair (docs/method.md: losses are mean token NLL, PPL = exp(loss)).
SCORE_COLUMNS = [
    "loss_q_direct",
    "loss_a_direct",
    "loss_q_condition",
    "loss_a_condition",
    "ppl_q_direct",
    "ppl_a_direct",
    "ppl_q_condition",
    "ppl_a_condition",
    "ifd_ppl",
    "rifd_ppl",
    "ifd_loss",
    "rifd_loss",
]
SCORES: dict[str, pl.DataType] = {name: pl.Float64 for name in SCORE_COLUMNS} | {
    # null when every score of the row is defined; otherwise why some are NaN
    "score_error": pl.String,
}


# The long table of scored pairs: the original and its variants, one row each, with scores.
SCORED: dict[str, pl.DataType] = RECORD | {
    "variant": pl.String,
    "parse_status": pl.String,
    "teacher": pl.String,
    "prompt_version": pl.String,
} | SCORES

# The wide table of decisions: one row per sample, every variant's pair and scores side by side
# as `{variant}_{column}`, then what the selection made of them.
_SIDE = {"instruction": pl.String, "input": pl.String, "output": pl.String} | SCORES | {"parse_status": pl.String}
DECISION: dict[str, pl.DataType] = {"sample_id": pl.String, "source_index": pl.Int64} | {
    f"{variant}_{name}": dtype for variant in VARIANTS for name, dtype in _SIDE.items()
} | {"branch": pl.String, "chosen": pl.String, "reason": pl.String, "chosen_ifd": pl.Float64, "selected": pl.Boolean}

# The selected data: the chosen variant of each selected sample, with its scores and lineage.
SELECTED: dict[str, pl.DataType] = {
    "sample_id": pl.String, "source_index": pl.Int64, "variant": pl.String, "branch": pl.String,
    "instruction": pl.String, "input": pl.String, "output": pl.String,
} | {name: pl.Float64 for name in SCORE_COLUMNS} | {"teacher": pl.String, "student": pl.String, "prompt_version": pl.String}


# The original pairs a baseline student trains on (reflectune.evaluation.baseline_pairs).
BASELINE: dict[str, pl.DataType] = {
    "sample_id": pl.String, "source_index": pl.Int64, "instruction": pl.String, "input": pl.String,
    "output": pl.String, "baseline": pl.String, "rank_value": pl.Float64,
}

# The evaluation's table: the selected data's student against each baseline on each test set.
EVALUATION: dict[str, pl.DataType] = {
    "baseline": pl.String, "test_set": pl.String, "n": pl.Int64, "wins": pl.Int64, "ties": pl.Int64,
    "losses": pl.Int64, "winning_score": pl.Float64, "unparsed_judgements": pl.Int64,
    "heldout_loss_model": pl.Float64, "heldout_loss_baseline": pl.Float64,
}


# The request journal (reflectune.journal): a teacher generation that returned, by request key.
JOURNAL: dict[str, pl.DataType] = {
    "key": pl.String,
    "text": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "finish_reason": pl.String,
    "constrained": pl.String,
}


def sample_id(instruction: str, input: str, output: str) -> str:
    """Stable content hash of a pair: the same pair gets the same id in every run."""
    payload = json.dumps([instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def check_columns(df: pl.DataFrame, required: dict[str, pl.DataType], stage: str, where: str = "") -> None:
    """Fail with every missing or mistyped column at once, naming the stage and the table."""
    problems = []
    for name, dtype in required.items():
        if name not in df.columns:
            problems.append(f"column '{name}' is missing")
        elif df.schema[name] != dtype and df.schema[name] != pl.Null:
            problems.append(f"column '{name}' has type {df.schema[name]}, expected {dtype}")
    if problems:
        place = f" ({where})" if where else ""
        raise SchemaError(
            f"{stage}: the table{place} does not fit schema v{SCHEMA_VERSION}: "
            + "; ".join(problems)
            + ". It was written by another version or another stage: rerun the stage that produces it."
        )


def write(df: pl.DataFrame, uri: str) -> None:
    """Write a table by its extension (reflectune.io.write_table); a Parquet file carries the
    schema version, so a reader of another version refuses it."""
    io.write_table(df, uri, {SCHEMA_KEY: str(SCHEMA_VERSION)} if uri.endswith(".parquet") else None)


def read(uri: str, schema: dict[str, pl.DataType], stage: str) -> pl.DataFrame:
    """A table written by a stage, refused with a message naming the file when its schema
    version is not this one's or a column is missing or of another type."""
    import io as _io

    import pyarrow.parquet as pq

    data = io.read_bytes(uri)
    metadata = pq.read_metadata(_io.BytesIO(data)).metadata or {}
    raw = metadata.get(SCHEMA_KEY.encode())
    version = int(raw) if raw is not None and raw.isdigit() else None
    if version is None:
        raise SchemaError(f"{stage}: {uri} carries no Reflectune schema version: it was written by an older "
                          "Reflectune or another tool. Rerun the stage that writes it (or write to a new output "
                          "folder).")
    if version != SCHEMA_VERSION:
        fix = ("upgrade Reflectune to read it" if version > SCHEMA_VERSION
               else "rerun the stage that writes it (or write to a new output folder)")
        raise SchemaError(f"{stage}: {uri} was written with schema v{version}, this Reflectune reads "
                          f"v{SCHEMA_VERSION}: {fix}.")
    df = pl.read_parquet(_io.BytesIO(data))
    check_columns(df, schema, stage, uri)
    return df
