"""The recycle pipeline's stages as plain functions over files.

input -> records -> shards -> variants (teacher) -> scores (student) -> decisions -> selected
-> trained student. Each stage reads the previous stage's Parquet and writes its own, named
after the input shard and a hash of everything that determines its content, so a stage whose
output exists is done: a rerun with the same parameters skips it. Files are written
atomically; the manifest is written last, so its presence means the run finished.

Prefect lives in tasks/ and flows/; this module only computes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from reflectune import intake, io, journal, prompts, reflection, scoring, selection
from reflectune.config import RecycleParams, StudentConfig, TeacherConfig
from reflectune.engines import BATCH_ENGINES
from reflectune.engines.batch_api import TALLY
from reflectune.records import (DECISION, PARSE_STATUSES, RECORD, REJECTED, SCORED, SELECTED, VARIANT, VARIANTS,
                                check_columns, read, write)
from reflectune.run_folder import FINISHED, RunFolder, shard_name
from reflectune.variants import BY_NAME

TEACHER_FIELDS = ("model", "engine", "base_url", "max_new_tokens", "temperature", "top_p", "retry_temperature", "seed",
                  "repetition_penalty", "constrained")
STUDENT_FIELDS = ("model", "engine", "template", "max_length", "dtype", "input_join")


@dataclass
class Shard:
    index: int
    uri: str
    rows: int
    content: str  # hash of the shard's sample ids

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class ShardResult:
    shard: str
    stage: str
    uri: str
    rows: int
    reused: bool
    seconds: float
    detail: dict[str, Any]


# -- intake and sharding -----------------------------------------------------------------------

def shard_dataset(params: RecycleParams) -> dict[str, Any]:
    """Validate the input, write the shards and the rejected rows; return the intake summary.
    A run that starts writing first takes back what said an earlier run had finished here."""
    data = intake.load(params.dataset, intake.parse_column_map(params.column_map), params.limit)
    out = RunFolder(params.output)
    for name in FINISHED:
        io.remove(out.file(name))
    shards = []
    for index, start in enumerate(range(0, data.valid.height, params.shard_size)):
        part = data.valid.slice(start, params.shard_size)
        uri = out.shard(index)
        content = _hash(part["sample_id"].to_list())
        if not _same_shard(uri, content):
            write(part, uri)
        shards.append(Shard(index, uri, part.height, content))
    write(data.rejected, out.intake_rejected)
    summary = {"source": params.dataset, **data.counts, "shards": [asdict(s) for s in shards]}
    io.write_json(summary, out.intake_summary)
    return summary


def _same_shard(uri: str, content: str) -> bool:
    if not io.exists(uri):
        return False
    try:
        return _hash(io.read_parquet(uri)["sample_id"].to_list()) == content
    except Exception:  # an unreadable leftover is rewritten
        return False


# -- keys ----------------------------------------------------------------------------------------

def model_identity(cfg: TeacherConfig | StudentConfig) -> str:
    if cfg.engine == "openai":
        from reflectune.engines.openai_compat import teacher_id

        return teacher_id(cfg.model, cfg.base_url)
    if cfg.engine in BATCH_ENGINES:
        from reflectune.engines.batch_api import batch_teacher_id

        return batch_teacher_id(cfg.engine, cfg.model, cfg.base_url)
    from reflectune.models import model_id

    return model_id(cfg.model)


def teacher_identity(cfg: TeacherConfig) -> str:
    """The teacher as every record names it, its variants' rows, `selected.parquet` and the
    manifest alike: the engine's own id (a model's answers depend on the engine that runs it)."""
    if cfg.engine in ("transformers", "vllm"):
        from reflectune.models import model_id

        return f"{cfg.engine}:{model_id(cfg.model)}"
    return model_identity(cfg)


def teacher_key(shard: Shard, cfg: TeacherConfig) -> str:
    settings = {k: getattr(cfg, k) for k in TEACHER_FIELDS} | {"id": model_identity(cfg)}
    return _hash(["teacher", shard.content, prompts.INSTRUCTION_VERSION, prompts.RESPONSE_VERSION, settings])


def student_key(shard: Shard, cfg: StudentConfig, teacher: str) -> str:
    from reflectune.models import model_id

    settings = {k: getattr(cfg, k) for k in STUDENT_FIELDS} | {"id": model_id(cfg.model)}
    return _hash(["student", shard.content, teacher, scoring.SCORING_VERSION, settings])


# -- where a shard's stage writes, and whether it is done: the one place that says so ------------

SHARD_STAGES = ("teacher", "student")


def target(params: RecycleParams, shard: Shard, stage: str) -> str:
    """The output file of `stage` for `shard` under these parameters. Its name carries the hash
    of everything that determines its content, so other settings write beside it."""
    # methods without a teacher score the originals alone
    teacher = teacher_key(shard, params.teacher) if params.selection.uses_teacher else "no-teacher"
    if stage == "teacher":
        return RunFolder(params.output).variants(shard.name, teacher)
    if stage == "student":
        return RunFolder(params.output).scores(shard.name, student_key(shard, params.scorer, teacher))
    raise ValueError(f"unknown shard stage '{stage}': choose one of {', '.join(SHARD_STAGES)}")


def done(target: str) -> ShardResult | None:
    """The result of a finished shard stage, or None. The stats file is written after the
    data file, and only when the stage did all its work, so its presence means done."""
    marker = f"{target}.json"
    if not (io.exists(marker) and io.exists(target)):
        return None
    result = ShardResult(**io.read_json(marker))
    result.reused = True
    return result


def finished(params: RecycleParams, shard: Shard, stage: str) -> ShardResult | None:
    return done(target(params, shard, stage))


# -- per-shard work ------------------------------------------------------------------------------


def _finish(result: ShardResult) -> ShardResult:
    io.write_json(asdict(result), f"{result.uri}.json")
    return result


def teacher_sampling(cfg: TeacherConfig) -> tuple[reflection.Sampling, reflection.Sampling]:
    """The first attempt's sampling and the retry's."""
    sampling = reflection.Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed, cfg.repetition_penalty,
                                   cfg.constrained)
    return sampling, reflection.retry_of(sampling, cfg.retry_temperature)


def journal_root(params: RecycleParams) -> str:
    """The run's request journal: every teacher generation that returned (reflectune.journal)."""
    return RunFolder(params.output).journal


def teacher_budget(cfg: TeacherConfig) -> journal.Budget | None:
    if cfg.budget_tokens is None and cfg.budget_usd is None:
        return None
    return journal.Budget(cfg.budget_tokens, cfg.budget_usd, *cfg.prices)


@contextmanager
def journaled(engine: Any, cfg: TeacherConfig, journal_at: str, records: pl.DataFrame) -> Iterator[journal.JournaledTeacher]:
    """`engine` behind the request journal at `journal_at` (for the source rows of `records`)
    and the budget of `cfg`: what every command that pays a teacher sends through. The
    journal's parts are merged when the work inside finishes."""
    rows = records["source_index"]
    with journal.behind(engine, journal_at, int(rows.min()) if rows.len() else 0,
                        int(rows.max()) if rows.len() else 0, teacher_budget(cfg)) as teacher:
        yield teacher


def teacher_shard(shard: Shard, target: str, cfg: TeacherConfig, engine: Any, journal_at: str,
                  progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """The shard's ins, res and ins_res variants, written to `target`. Requests the journal at
    `journal_at` holds are replayed, the rest sent under the budget and journaled as they
    return. `progress(generations, new_tokens, total=None)` is called as generations finish,
    and with the total when retries add to it."""
    start = time.perf_counter()
    records = read(shard.uri, RECORD, "teacher")
    sampling, retry = teacher_sampling(cfg)
    usage = dict(vars(engine.usage)) if hasattr(engine, "usage") else {}
    with journaled(engine, cfg, journal_at, records) as teacher:
        variants = reflection.reflect(records, teacher, "both", sampling, retry, progress,
                                      plan=(lambda total: progress(0, 0, total)) if progress else None,
                                      verify=cfg.verify)
    check_columns(variants, VARIANT, "teacher output")
    write(variants, target)
    status = variants.group_by("parse_status").len()
    http = {}
    if usage:  # an API engine: its HTTP attempts and 429s during this shard
        http = {"http_requests": engine.usage.requests - usage["requests"],
                "rate_limited": engine.usage.rate_limited - usage["rate_limited"]}
    return _finish(ShardResult(shard.name, "teacher", target, records.height, False, time.perf_counter() - start, {
        "generations": int(variants["raw_text"].list.len().sum()),
        "prompt_tokens": int(variants["prompt_tokens"].sum()),
        "completion_tokens": int(variants["completion_tokens"].sum()),
        "constrained": int(variants["constrained"].list.eval(pl.element() != "none").list.sum().sum()),
        **{f"parse_{s}": int(n) for s, n in status.iter_rows()},
        **spend_detail("sent", teacher.sent), **spend_detail("replayed", teacher.replayed), **http,
        "requests_answered": teacher.answered.requests,
        **({k: teacher.batches[k] for k in TALLY} if getattr(engine, "submits_batches", False) else {}),
    }))


def spend_detail(what: str, spend: journal.Spend) -> dict[str, int]:
    """Requests and tokens `what` (sent or replayed) as a shard's detail counts them."""
    return {f"requests_{what}": spend.requests, f"{what}_prompt_tokens": spend.prompt_tokens,
            f"{what}_completion_tokens": spend.completion_tokens}


def student_shard(shard: Shard, variants_at: str | None, target: str, cfg: StudentConfig, engine: Any,
                  progress: Callable[..., None] | None = None) -> ShardResult:
    """Scores of the four variants of every sample in the shard, written to `target`.
    `progress(tokens, tokens, total_tokens)` is called as batches finish."""
    start = time.perf_counter()
    records = read(shard.uri, RECORD, "student")
    # a method without a teacher scores the originals alone
    variants = pl.DataFrame(schema=VARIANT) if variants_at is None else read(variants_at, VARIANT, "student")
    table = long_table(records, variants)
    advance = (lambda n, total: progress(n, n, total)) if progress else None
    counts: dict[str, int] = {}
    scored = scoring.score_table(table, engine, cfg.template, cfg.max_length, advance, cfg.input_join, counts)
    check_columns(scored, SCORED, "student output")
    write(scored, target)
    return _finish(ShardResult(shard.name, "student", target, records.height, False, time.perf_counter() - start, {
        "sequences": counts.get("sequences", 0),
        "sequences_scored": counts.get("sequences_scored", 0),
        "nan_rows": int(scored["score_error"].is_not_null().sum()),
    }))


def long_table(records: pl.DataFrame, variants: pl.DataFrame) -> pl.DataFrame:
    """One row per (sample, variant): the original as `orig` plus the teacher's variants."""
    orig = records.select(list(RECORD)).with_columns(
        variant=pl.lit("orig"), parse_status=pl.lit("ok"), teacher=pl.lit(None, pl.String),
        prompt_version=pl.lit(None, pl.String))
    rest = variants.select(*RECORD, "variant", "parse_status", "teacher", "prompt_version")
    order = {v: i for i, v in enumerate(VARIANTS)}
    return pl.concat([orig, rest]).sort(
        pl.col("source_index"), pl.col("variant").replace_strict(order, return_dtype=pl.Int8))


# -- join, selection, outputs --------------------------------------------------------------------

def select_and_write(params: RecycleParams, score_uris: list[str], intake_summary: dict[str, Any],
                     teacher_id: str, student_id: str) -> dict[str, Any]:
    folder = RunFolder(params.output)
    sel = params.selection
    if score_uris:
        scored = pl.concat([read(u, SCORED, "selection") for u in score_uris])
        decisions = selection.select(selection.wide(scored), sel.mode, sel.fraction, sel.method)
    else:
        decisions = pl.DataFrame(schema=DECISION)
    check_columns(decisions, DECISION, "selection output")
    chosen = selection.selected_rows(decisions)
    prompt_version = {name: v.prompt_version for name, v in BY_NAME.items()}
    selected = chosen.with_columns(
        teacher=pl.when(pl.col("variant") == "orig").then(None).otherwise(pl.lit(teacher_id, pl.String)),
        student=pl.lit(student_id),
        prompt_version=pl.col("variant").replace_strict(prompt_version, return_dtype=pl.String),
    )
    check_columns(selected, SELECTED, "selection output")
    write(decisions, folder.decisions)
    write(selected, folder.selected)
    write(selected.select("instruction", "input", "output"), folder.selected_jsonl)
    write(read(folder.intake_rejected, REJECTED, "selection"), folder.rejected)
    branches = decisions.group_by("branch", "selected").len() if decisions.height else pl.DataFrame()
    per_branch = {f"{b}_{'kept' if s else 'dropped'}": int(n) for b, s, n in branches.iter_rows()} if branches.height else {}
    return {
        "input_rows": intake_summary["input_rows"],
        "valid_rows": intake_summary["valid_rows"],
        "rejected_rows": intake_summary["rejected_rows"],
        "duplicate_rows": intake_summary["duplicate_rows"],
        "selected_rows": selected.height,
        "dropped_rows": decisions.height - selected.height,
        "per_branch": dict(sorted(per_branch.items())),
        "per_variant": {v: int(n) for v, n in selected.group_by("variant").len().iter_rows()},
        "parse_status": parse_status(decisions),
        "selected_rewrites_usable": usable_rewrites(decisions),
    }


def parse_status(decisions: pl.DataFrame) -> dict[str, dict[str, int]]:
    """How the teacher's outputs parsed, per variant: {variant: {status: samples}}; empty
    where no teacher ran."""
    out = {}
    for variant in VARIANTS[1:]:
        counts = dict(decisions[f"{variant}_parse_status"].drop_nulls().value_counts().iter_rows())
        if counts:
            out[variant] = {s: int(counts[s]) for s in PARSE_STATUSES if s in counts}
    return out


def usable_rewrites(decisions: pl.DataFrame) -> int:
    """Selected samples whose chosen variant is a usable rewrite (parse status ok): the summary
    holds it against the rewrites selected, so a fallen-back variant in the selection shows."""
    chosen = decisions.filter(pl.col("selected") & (pl.col("chosen") != "orig"))
    return sum(row[f"{row['chosen']}_parse_status"] == "ok" for row in chosen.iter_rows(named=True))


def train_selected(params: RecycleParams) -> dict[str, Any]:
    """The student fine-tuned on the selected pairs, its metrics written beside it with a key of
    what determines it (the pairs, the student, the training settings): a rerun (after a later
    step failed) reuses a finished training instead of training again. `reused` says which."""
    from reflectune import training

    out = RunFolder(params.output)
    selected = read(out.selected, SELECTED, "training")
    key = _hash([selected.select("instruction", "input", "output").to_dicts(), params.student.model_dump(),
                 params.training.model_dump()])
    if io.exists(out.training) and io.exists(out.model):
        kept = io.read_json(out.training)
        if kept.get("key") == key and kept.get("trained"):
            return kept | {"reused": True}
    metrics = training.train(selected.select("instruction", "input", "output"), params.student, params.training,
                             out.model)
    metrics = {**metrics, "key": key}
    io.write_json(metrics, out.training)
    return metrics | {"reused": False}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
