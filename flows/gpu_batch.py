"""The GPU batch flow: one worker process loads its engine once and works through a batch
of shards with the same per-shard tasks the local mode uses. Deployed on a GPU work pool;
the recycle flow starts one run per batch with `run_deployment`."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.cluster import GPU_BATCH_FLOW

from reflectune.config import RecycleParams
from reflectune.engines import pool
from tasks.outputs import evaluate_students, train_baseline, train_student
from tasks.shards import student_shard, teacher_shard


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
    (a spent budget)."""
    return getattr(state.data, "retryable", True)


@flow(name=GPU_BATCH_FLOW, log_prints=False)
def gpu_batch(stage: Literal["teacher", "student", "train", "baseline", "evaluate"], shards: list[dict[str, Any]],
              params: RecycleParams) -> list[dict[str, Any]]:
    try:
        if stage == "train":
            return [with_retries(train_student, params)(params)]
        if stage == "evaluate":
            return [with_retries(evaluate_students, params)(params)]
        if stage == "baseline":  # one baseline's student: `shards` names it, [{"kind": KIND}]
            return [with_retries(train_baseline, params)(params, shards[0]["kind"])]
        work = with_retries(teacher_shard if stage == "teacher" else student_shard, params)
        return [work(shard, params) for shard in shards]
    finally:
        pool.close_all()


if __name__ == "__main__":
    gpu_batch.serve(name="gpu")
