"""Per-shard tasks: teacher reflection and student scoring of one Parquet shard.

A shard's stage is done when `stages.done` finds its output; otherwise the task runs it with
the worker's engine. Anything that goes wrong while it runs fails the task (Prefect retries
it) and no done marker is written, so a later run redoes exactly the shards left undone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task

from reflectune import stages
from reflectune.config import RecycleParams, TeacherConfig
from reflectune.engines import pool, student_options, teacher_options
from reflectune.errors import shard_failed


def _api_key(cfg: TeacherConfig) -> str | None:
    """The key from a Prefect Secret block when one is named; else the engine reads the
    environment variable itself. Never logged."""
    if not cfg.api_key_block:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(cfg.api_key_block).get()


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
            options = teacher_options(cfg, params.vllm, params.student)
            if cfg.engine == "openai":
                options["api_key"] = _api_key(cfg)
            with pool.using("teacher", cfg.engine, cfg.model, **options) as engine:
                result = stages.teacher_shard(s, target, cfg, engine)
        else:
            variants = stages.target(params, s, "teacher")
            if stages.done(variants) is None:
                raise RuntimeError(f"the teacher variants {variants} are missing: the teacher stage must run first")
            cfg = params.student
            options = student_options(cfg, params.vllm, params.teacher)
            with pool.using("student", cfg.engine, cfg.model, **options) as engine:
                result = stages.student_shard(s, variants, target, cfg, engine)
    except Exception as exc:
        raise shard_failed(stage, s.name, exc) from exc
    log.info("%s: %d rows, %s stage done in %.1fs (%s)", s.name, result.rows, stage, result.seconds, result.detail)
    return asdict(result)


@task(name="teacher-shard", tags=["reflectune", "teacher"], cache_result_in_memory=False)
def teacher_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    return _run("teacher", shard, params)


@task(name="student-shard", tags=["reflectune", "student"], cache_result_in_memory=False)
def student_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    return _run("student", shard, params)
