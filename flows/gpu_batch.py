"""The GPU batch flow: one worker process loads its engine once and works through a batch
of shards with the same per-shard tasks the local mode uses. Deployed on a GPU work pool;
the recycle flow starts one run per batch with `run_deployment`. Training and evaluation
have their own flow (flows/gpu_step.py)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from reflectune.config import RecycleParams
from reflectune.engines import pool
from reflectune.flows.cluster import GPU_BATCH_FLOW, batch_run_name, recording_stops
from reflectune.tasks.retries import with_retries
from reflectune.tasks.shards import student_shard, teacher_shard


@flow(name=GPU_BATCH_FLOW, log_prints=False)
def gpu_batch(stage: Literal["teacher", "student"], shards: list[dict[str, Any]],
              params: RecycleParams) -> list[dict[str, Any]]:
    try:
        with recording_stops(params, batch_run_name(stage, shards)):
            work = with_retries(teacher_shard if stage == "teacher" else student_shard, params)
            return [work(shard, params) for shard in shards]
    finally:
        pool.close_all()


if __name__ == "__main__":
    gpu_batch.serve(name="gpu")
