"""Engines run models; the method's logic stays in scoring and reflection modules.

Heavy imports (torch, transformers, vllm) happen inside the engine modules' functions, so
every module imports on a CPU-only install without them. Choosing an engine is a plain
if/elif: there are three.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflectune.config import StudentConfig, TeacherConfig, VLLMConfig

STUDENT_ENGINES = ("transformers", "vllm")
TEACHER_ENGINES = ("transformers", "vllm", "openai")


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
    raise ValueError(f"unknown teacher engine '{engine}': choose one of {', '.join(TEACHER_ENGINES)}")


# -- engine options: built here, from the configuration, for every caller ----------------------

def shared_vllm(teacher: TeacherConfig | None, student: StudentConfig | None) -> bool:
    """Teacher and student are one model on vLLM: one engine serves both roles."""
    return bool(teacher and student and teacher.engine == student.engine == "vllm" and teacher.model == student.model)


def teacher_options(teacher: TeacherConfig, vllm: VLLMConfig, student: StudentConfig | None = None, *,
                    dtype: str = "auto", device: str | None = None) -> dict[str, Any]:
    """Options of `load_teacher` for this configuration (the API key is added by the caller);
    `dtype` and `device` for a local engine where the caller picks them (the command line)."""
    if teacher.engine == "openai":
        return {"base_url": teacher.base_url, "api_key_env": teacher.api_key_env, "concurrency": teacher.concurrency,
                "timeout": teacher.request_timeout, "max_retries": teacher.request_retries}
    if teacher.engine == "vllm":
        if shared_vllm(teacher, student):
            return student_options(student, vllm, teacher)
        return _vllm_options(vllm, dtype, None)
    return {"batch_size": teacher.batch_size, "dtype": dtype} | _device(device)


def student_options(student: StudentConfig, vllm: VLLMConfig, teacher: TeacherConfig | None = None, *,
                    device: str | None = None) -> dict[str, Any]:
    """Options of `load_student`; where the teacher is the same model on vLLM, the very options
    the teacher gets, so the engine pool hands both roles one engine."""
    if student.engine == "vllm":
        # scoring needs max_length tokens plus the one vLLM generates
        need = student.max_length + 1
        if shared_vllm(teacher, student):
            return _vllm_options(vllm, student.dtype, need if need > 4096 else None)
        return _vllm_options(vllm, student.dtype, need)
    return {"dtype": student.dtype} | _device(device)


def judge_options(engine: str, base_url: str | None, api_key_env: str | None, batch_size: int) -> dict[str, Any]:
    """Options of `load_teacher` for the evaluation's judge: an openai judge's endpoint and key,
    a transformers judge's batch."""
    if engine == "openai":
        return {"base_url": base_url} | ({"api_key_env": api_key_env} if api_key_env else {})
    return {"batch_size": batch_size} if engine == "transformers" else {}


def _device(device: str | None) -> dict[str, Any]:
    return {"device": device} if device else {}


def _vllm_options(vllm: VLLMConfig, dtype: str, max_model_len: int | None) -> dict[str, Any]:
    return {"dtype": dtype, "max_model_len": vllm.max_model_len or max_model_len,
            "gpu_memory_utilization": vllm.gpu_memory_utilization,
            "kv_cache_bytes": round(vllm.kv_cache_gib * (1 << 30)) if vllm.kv_cache_gib else None,
            "kv_cache_sequences": vllm.kv_cache_sequences, "tensor_parallel_size": vllm.tensor_parallel_size}
