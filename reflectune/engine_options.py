"""Engine options built from the configuration, here for every caller (the command line, the
shard tasks): which options `engines.load_teacher` and `engines.load_student` get, and when
one vLLM engine serves both roles."""

from __future__ import annotations

from typing import Any

from reflectune.config import StudentConfig, TeacherConfig, VLLMConfig
from reflectune.engines.vllm_args import DEFAULT_CONTEXT


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
    if teacher.batched:
        return {"base_url": teacher.base_url, "api_key_env": teacher.api_key_env,
                "poll_seconds": teacher.batch_poll_seconds, "poll_max_seconds": teacher.batch_poll_max_seconds,
                "max_requests": teacher.batch_max_requests, "max_bytes": teacher.batch_max_bytes,
                "max_resubmits": teacher.batch_resubmits, "timeout": teacher.request_timeout}
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
            return _vllm_options(vllm, student.dtype, need if need > DEFAULT_CONTEXT else None)
        return _vllm_options(vllm, student.dtype, need)
    return {"dtype": student.dtype} | _device(device)


def _device(device: str | None) -> dict[str, Any]:
    return {"device": device} if device else {}


def _vllm_options(vllm: VLLMConfig, dtype: str, max_model_len: int | None) -> dict[str, Any]:
    return {"dtype": dtype, "max_model_len": vllm.max_model_len or max_model_len,
            "gpu_memory_utilization": vllm.gpu_memory_utilization,
            "kv_cache_bytes": round(vllm.kv_cache_gib * (1 << 30)) if vllm.kv_cache_gib else None,
            "kv_cache_sequences": vllm.kv_cache_sequences, "tensor_parallel_size": vllm.tensor_parallel_size}
