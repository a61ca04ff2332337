"""The GPU step flow: one whole-run step that needs the device (training the student on the
selected data, training one baseline's student, the evaluation) on one GPU worker. Deployed
on the GPU work pool beside the batch flow; the recycle flow starts one run per step with
`run_deployment` and reads the step's result from the output folder."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from reflectune.config import RecycleParams
from reflectune.engines import pool
from reflectune.flows.cluster import GPU_STEP_FLOW, recording_stops, step_run_name
from reflectune.tasks.outputs import evaluate_students, train_baseline, train_student
from reflectune.tasks.retries import with_retries


@flow(name=GPU_STEP_FLOW, log_prints=False)
def gpu_step(step: Literal["train", "baseline", "evaluate"], params: RecycleParams,
             baseline: str | None = None) -> dict[str, Any]:
    """`baseline` names the baseline whose student the `baseline` step trains."""
    try:
        with recording_stops(params, step_run_name(step, baseline)):
            if step == "train":
                return with_retries(train_student, params)(params)
            if step == "baseline":
                return with_retries(train_baseline, params)(params, baseline)
            return with_retries(evaluate_students, params)(params)
    finally:
        pool.close_all()


if __name__ == "__main__":
    gpu_step.serve(name="gpu-step")
