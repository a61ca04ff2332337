"""The run's retries, applied to any task: `execution.retries` with exponential backoff and
jitter, and none for an error that says a retry cannot mend it. Every flow applies them
through `with_retries`, the one place they are set."""

from __future__ import annotations

from reflectune.config import RecycleParams


def with_retries(task_fn, params: RecycleParams):
    from prefect.tasks import exponential_backoff

    ex = params.execution
    return task_fn.with_options(
        retries=ex.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=ex.retry_delay_seconds) if ex.retry_delay_seconds else 0,
        retry_jitter_factor=0.5 if ex.retry_delay_seconds else None,
        retry_condition_fn=retryable,
    )


def retryable(task, task_run, state) -> bool:
    """Whether a failed task may be retried: not when its error says a retry cannot mend it
    (a spent budget, an input fact)."""
    return getattr(state.data, "retryable", True)
