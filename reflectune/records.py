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

from reflectune.errors import SchemaError

SCHEMA_VERSION = 2

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

# A teacher variant of a sample (METHOD.md: ins, res, ins_res), with everything the teacher
# wrote: the raw text of every attempt, how parsing went, and what it cost.
VARIANTS = ("orig", "ins", "res", "ins_res")
VARIANT: dict[str, pl.DataType] = RECORD | {
    "variant": pl.String,
    "raw_text": pl.List(pl.String),
    # per attempt, how the output format was enforced: regex, json_schema or none
    "constrained": pl.List(pl.String),
    # ok: every field parsed; degenerate: every field present and closed, but some are loops
    # or copies of the original (they fall back); partial: some field fell back to the base
    # pair's; fallback: all did
    "parse_status": pl.String,
    "parse_detail": pl.String,
    "prompt_version": pl.String,
    "teacher": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
}

# Student scores of one pair (METHOD.md: losses are mean token NLL, PPL = exp(loss)).
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


def empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)
