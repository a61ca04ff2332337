"""Engines run models; the method's logic stays in scoring and reflection modules.

Heavy imports (torch, transformers, vllm, openai) happen inside the engine modules' functions,
so every module imports on a CPU-only install without them.
"""

from __future__ import annotations

from typing import Any

STUDENT_ENGINES = ("transformers",)


def load_student(engine: str, spec: str, **options: Any) -> Any:
    """A student engine (see scoring.StudentEngine) for `spec`."""
    if engine == "transformers":
        from reflectune.engines.hf import TransformersScorer

        return TransformersScorer(spec, **options)
    raise ValueError(f"unknown student engine '{engine}': choose one of {', '.join(STUDENT_ENGINES)}")
