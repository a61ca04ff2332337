"""Per-shard tasks: teacher reflection and student scoring of one Parquet shard."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task

from reflectune import stages
from reflectune.config import RecycleParams, StudentConfig, TeacherConfig
from reflectune.engines import pool


def teacher_options(cfg: TeacherConfig) -> dict[str, Any]:
    if cfg.engine == "openai":
        return {"base_url": cfg.base_url, "api_key": _api_key(cfg), "api_key_env": cfg.api_key_env,
                "concurrency": cfg.concurrency, "timeout": cfg.request_timeout}
    if cfg.engine == "vllm":
        return {}
    return {"batch_size": cfg.batch_size}


def student_options(cfg: StudentConfig) -> dict[str, Any]:
    if cfg.engine == "vllm":
        return {"dtype": cfg.dtype, "max_model_len": max(cfg.max_length + 1, 2048)}
    return {"dtype": cfg.dtype}


def _api_key(cfg: TeacherConfig) -> str | None:
    """The key from a Prefect Secret block when one is named; else the engine reads the
    environment variable itself. Never logged."""
    if not cfg.api_key_block:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(cfg.api_key_block).get()


@task(name="teacher-shard", tags=["reflectune", "teacher"], cache_result_in_memory=False)
def teacher_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    log = get_run_logger()
    s = stages.Shard(**shard)
    target = stages.variants_uri(params.output, s, stages.teacher_key(s, params.teacher))
    finished = stages.done(target)
    if finished:
        log.info("%s: teacher variants already written, reusing %s", s.name, target)
        return asdict(finished)
    cfg = params.teacher
    with pool.using("teacher", cfg.engine, cfg.model, **teacher_options(cfg)) as engine:
        result = stages.teacher_shard(s, target, cfg, engine)
    log.info("%s: %d rows reflected in %.1fs (%s)", s.name, result.rows, result.seconds, result.detail)
    return asdict(result)


@task(name="student-shard", tags=["reflectune", "student"], cache_result_in_memory=False)
def student_shard(shard: dict[str, Any], params: RecycleParams) -> dict[str, Any]:
    log = get_run_logger()
    s = stages.Shard(**shard)
    teacher_key = stages.teacher_key(s, params.teacher)
    variants = stages.variants_uri(params.output, s, teacher_key)
    target = stages.scores_uri(params.output, s, stages.student_key(s, params.student, teacher_key))
    finished = stages.done(target)
    if finished:
        log.info("%s: scores already written, reusing %s", s.name, target)
        return asdict(finished)
    if stages.done(variants) is None:
        raise RuntimeError(f"{s.name}: the teacher variants {variants} are missing: the teacher stage must run first")
    cfg = params.student
    with pool.using("student", cfg.engine, cfg.model, **student_options(cfg)) as engine:
        result = stages.student_shard(s, variants, target, cfg, engine)
    log.info("%s: %d rows scored in %.1fs (%s)", s.name, result.rows, result.seconds, result.detail)
    return asdict(result)
