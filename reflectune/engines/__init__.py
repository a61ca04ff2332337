"""Engines run models; the method's logic stays in scoring and reflection modules.

Heavy imports (torch, transformers, vllm) happen inside the engine modules' functions, so
every module imports on a CPU-only install without them. Choosing an engine is a plain
if/elif: there are five.
"""

from __future__ import annotations

from typing import Any

STUDENT_ENGINES = ("transformers", "vllm")
# engines that answer through a provider's batch API (reflectune.engines.batch_api)
BATCH_ENGINES = ("openai-batch", "anthropic-batch")
TEACHER_ENGINES = ("transformers", "vllm", "openai", *BATCH_ENGINES)
# engines that are a remote API: no model loads here, a key is needed
API_ENGINES = ("openai", *BATCH_ENGINES)
# the engine of every model role (teacher, student, judge) unless told otherwise: runs anywhere
DEFAULT_ENGINE = "transformers"


def load_student(engine: str, spec: str, **options: Any) -> Any:
    """A student engine (scoring.StudentEngine) for the model `spec`."""
    if engine == "transformers":
        from reflectune.engines.hf import TransformersScorer

        return TransformersScorer(spec, **options)
    if engine == "vllm":
        from reflectune.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec, **options)
    raise ValueError(f"unknown student engine '{engine}': choose one of {', '.join(STUDENT_ENGINES)}")


def load_teacher(engine: str, spec: str, **options: Any) -> Any:
    """A teacher engine (reflection.TeacherEngine). For `openai`, `spec` is the served model
    name and options carry base_url, api_key or api_key_env, concurrency, timeout."""
    if engine == "transformers":
        from reflectune.engines.hf import TransformersTeacher

        return TransformersTeacher(spec, **options)
    if engine == "vllm":
        from reflectune.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec, **options)
    if engine == "openai":
        from reflectune.engines.openai_compat import OpenAITeacher

        return OpenAITeacher(spec, **options)
    if engine in BATCH_ENGINES:
        from reflectune.engines.batch_api import BatchTeacher

        return BatchTeacher(spec, engine, **options)
    raise ValueError(f"unknown teacher engine '{engine}': choose one of {', '.join(TEACHER_ENGINES)}")


def judge_options(engine: str, base_url: str | None, api_key_env: str | None, batch_size: int) -> dict[str, Any]:
    """Options of `load_teacher` for the evaluation's judge: an API judge's endpoint and key
    (every API engine: a batch judge given a URL must never fall back to the provider's), a
    transformers judge's batch."""
    if engine in API_ENGINES:
        return {"base_url": base_url} | ({"api_key_env": api_key_env} if api_key_env else {})
    return {"batch_size": batch_size} if engine == "transformers" else {}
