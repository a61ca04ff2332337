"""Per-shard tasks: teacher reflection and student scoring of one Parquet shard.

A shard's stage is done when `stages.done` finds its output; otherwise the task runs it with
the worker's engine. Anything that goes wrong while it runs fails the task (Prefect retries
it) and no done marker is written, so a later run redoes exactly the shards left undone.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task

from reflectune import progress, stages
from reflectune.config import RecycleParams, TeacherConfig
from reflectune.engine_options import student_options, teacher_options
from reflectune.engines import API_ENGINES, pool
from reflectune.errors import RESUME, Interrupted, ReflectuneError, SettingError, ShardFailedError
from reflectune.secrets import redact


def shard_failed(stage: str, shard: str, cause: BaseException) -> ReflectuneError:
    """The error a shard task fails with: the cause itself where it already says what to do and
    no retry can mend it; else the cause with how to resume, retried where it may pass."""
    if isinstance(cause, ShardFailedError) or (isinstance(cause, ReflectuneError) and not cause.retryable):
        return cause
    if progress.stop.is_set():  # an engine cut off by the user's Ctrl-C: not a failure to retry
        return Interrupted(progress.INTERRUPTED)
    return ShardFailedError(f"the {stage} stage failed on shard {shard}: {type(cause).__name__}: {redact(str(cause))}. "
                            f"{RESUME}",
                            retryable=getattr(cause, "retryable", True))


def _api_key(cfg: TeacherConfig) -> str | None:
    """The key from a Prefect Secret block when one is named; else the engine reads the
    environment variable itself. Never logged."""
    if not cfg.api_key_block:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(cfg.api_key_block).get()


def _shared_limit(name: str):
    """Each teacher request takes a slot of the Prefect global concurrency limit `name`; its
    slot decay makes it a rate that holds across every worker, kept by the server."""

    async def take() -> None:
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, rate_limit

        try:
            await rate_limit(name, occupy=1, strict=True)
        except ConcurrencySlotAcquisitionError as exc:
            raise SettingError(
                f"teacher.rate_limit '{name}': {exc}. Create it with slot decay, e.g. `prefect gcl create {name} "
                "--limit 600 --slot-decay-per-second 10` (600 requests a minute), or leave teacher.rate_limit "
                "empty") from None

    return take


def _run(stage: str, shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    log = get_run_logger()
    s = stages.Shard(**shard)
    target = stages.target(params, s, stage)
    finished = stages.done(target)
    if finished:
        log.info("%s: %s output already written, reusing %s", s.name, stage, target)
        return asdict(finished)
    try:
        if stage == "teacher":
            cfg = params.teacher
            options = teacher_options(cfg, params.vllm, params.scorer)
            if cfg.engine in API_ENGINES:
                options["api_key"] = _api_key(cfg)
            with pool.using("teacher", cfg.engine, cfg.model, **options) as engine, \
                    _watched("teacher", s, 3 * s.rows, "generations") as advance:
                if cfg.engine == "openai":
                    engine.shared_limit = _shared_limit(cfg.rate_limit) if cfg.rate_limit else None
                result = stages.teacher_shard(s, target, cfg, engine, stages.journal_root(params), advance)
        else:
            variants = stages.target(params, s, "teacher") if params.selection.uses_teacher else None
            if variants is not None and stages.done(variants) is None:
                raise RuntimeError(f"the teacher variants {variants} are missing: the teacher stage must run first")
            cfg = params.scorer
            options = student_options(cfg, params.vllm, params.teacher if params.selection.uses_teacher else None)
            with pool.using("student", cfg.engine, cfg.model, **options) as engine, \
                    _watched("student", s, 0, "tokens") as advance:
                result = stages.student_shard(s, variants, target, cfg, engine, advance)
    except Exception as exc:
        raise shard_failed(stage, s.name, exc) from exc
    log.info("%s: %d rows, %s stage done in %.1fs (%s)", s.name, result.rows, stage, result.seconds, result.detail)
    return asdict(result)


@contextmanager
def _watched(stage: str, shard: stages.Shard, total: int, unit: str):
    """Progress inside a shard, for a person watching: every advance reaches the library's hook
    (the CLI's bar); a Prefect progress artifact per shard is refreshed every few seconds from
    a thread of its own (engines report from their own threads and event loops)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    meter = progress.Meter(total, unit)
    key = f"reflectune-{stage}-{shard.name}"
    artifact = create_progress_artifact(0.0, key=key, description=f"{stage} {shard.name}: starting")
    stop = threading.Event()

    notes = [""]

    def advance(done: int, tokens: int, total: int | None = None, note: str | None = None) -> None:
        """`total`: the student learns its total (tokens) when its sequences are built; `note`:
        a batch API's lines done and failed per batch."""
        if total is not None:
            meter.total = max(total, 1)
        if note is not None:
            notes[0] = note
        meter.add(done, tokens)
        progress.report("work", stage=stage, shard=shard.name, done=meter.done, total=meter.total, unit=unit,
                        rate=meter.rate, note=notes[0])

    def line() -> str:
        return meter.line() + (f"; {notes[0]}" if notes[0] else "")

    def refresh() -> None:
        while not stop.wait(3.0):
            update_progress_artifact(artifact, meter.percent, description=f"{stage} {shard.name}: {line()}")

    # in the task's context: the thread reports to the task's Prefect API, however it was set
    thread = threading.Thread(target=contextvars.copy_context().run, args=(refresh,), daemon=True)
    thread.start()
    try:
        yield advance
    finally:
        stop.set()
        thread.join(10)
    update_progress_artifact(artifact, 100.0, description=f"{stage} {shard.name}: done, {line()}")


@task(name="teacher-shard", tags=["reflectune", "teacher"], cache_result_in_memory=False)
def teacher_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    return _run("teacher", shard, params)


@task(name="student-shard", tags=["reflectune", "student"], cache_result_in_memory=False)
def student_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    return _run("student", shard, params)
