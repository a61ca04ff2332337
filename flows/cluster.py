"""What a Prefect server needs before Reflectune's deployments run on it: the work pools and
the automation that marks a dead worker's flow runs Crashed.

A worker that dies with its machine leaves its flow runs Running forever. Flow runs started
by a worker send heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds apart, set on the
workers); the automation marks a GPU batch or GPU step run Crashed when its heartbeats stop,
and the recycle flow then launches it again on a live worker (a batch skips the shards
already done). Other flow runs are left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

AUTOMATION = "reflectune: crash runs whose heartbeats stopped"
GPU_BATCH_FLOW = "reflectune-gpu-batch"
GPU_STEP_FLOW = "reflectune-gpu-step"
ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"kubernetes": ROOT / "infra" / "kubernetes" / "gpu-base-job-template.json"}


@contextmanager
def recording_stops(params: Any, run: str) -> Iterator[None]:
    """Around a GPU flow run's work: an error a retry cannot mend (a spent budget, an input
    fact) is written to the run folder (RunFolder.stop) before it fails the run, so the recycle
    run that launched it raises the same error (`recorded_stop`), not a reading of a message."""
    from reflectune import io
    from reflectune.errors import ReflectuneError
    from reflectune.run_folder import RunFolder

    at = RunFolder(params.output).stop(run)
    io.remove(at)  # an earlier try's stop is not this one's
    try:
        yield
    except ReflectuneError as exc:
        if not exc.retryable:
            io.write_json({"error": type(exc).__name__, "message": str(exc)}, at)
        raise


def recorded_stop(params: Any, run: str) -> Exception | None:
    """The error a GPU flow run named `run` stopped on, as its own type, or None."""
    from reflectune import errors, io
    from reflectune.run_folder import RunFolder

    at = RunFolder(params.output).stop(run)
    if not io.exists(at):
        return None
    kept = io.read_json(at)
    kind = getattr(errors, kept.get("error", ""), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.ReflectuneError)) or kind is errors.ShardFailedError:
        kind = errors.ReflectuneError
    return kind(kept.get("message", ""))


def batch_run_name(stage: str, shards: list[dict[str, Any]]) -> str:
    """A GPU batch run's name in the run folder: its stage and first shard."""
    from reflectune.run_folder import shard_name

    return f"{stage}-{shard_name(shards[0]['index'])}" if shards else stage


def step_run_name(step: str, baseline: str | None) -> str:
    """A GPU step run's name in the run folder."""
    return f"{step}-{baseline}" if baseline else step


def setup(pools: dict[str, str], heartbeat_seconds: int = 30, grace_seconds: int = 60) -> dict[str, Any]:
    """Create the work pools that are missing ({name: type}) and the zombie-run automation
    (replaced when it exists, so a changed grace period takes effect)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name, kind in pools.items():
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=_template(kind)))
            created.append(name)
        for existing in client.read_automations_by_name(AUTOMATION):
            client.delete_automation(existing.id)
    automation = _automation(heartbeat_seconds + grace_seconds)
    return {"pools_created": created, "automation": str(automation.id)}


def _template(kind: str) -> dict[str, Any]:
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    if kind in TEMPLATES:
        return json.loads(TEMPLATES[kind].read_text())
    raise ValueError(f"work pool type '{kind}' has no template here: use process or kubernetes, or create the "
                     f"pool with `prefect work-pool create NAME --type {kind}`")


def _automation(within_seconds: int):
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture, ResourceSpecification
    from prefect.client.schemas.objects import StateType

    return Automation(
        name=AUTOMATION,
        description="Marks a flow run Crashed when it stops sending heartbeats (its worker or machine died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # only the GPU runs, which the recycle flow launches again: a late heartbeat of the
            # orchestrating run on a loaded server must not crash the whole run
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": [GPU_BATCH_FLOW, GPU_STEP_FLOW]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"No heartbeat for {within_seconds}s: "
                                    "the worker running this flow run is gone.")],
    ).create()
