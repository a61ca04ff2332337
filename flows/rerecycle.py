"""Scheduled re-recycling: recycle only the rows of a watched location that earlier runs have
not seen, each batch into its own folder beside the earlier ones (see reflectune.watch).

The parameters are the recycle flow's, read differently: `dataset` is the watched folder or
s3:// prefix (or one file that grows), `output` the root that holds the ledger, the batch
inputs and one `runs/batch-*` folder per batch.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from reflectune import watch
from reflectune.config import RecycleParams
from reflectune.flows.recycle import recycle
from reflectune.tasks.retries import with_retries


@task(name="find-new-rows", tags=["reflectune"])
def find_new_rows(params: RecycleParams) -> watch.Batch | None:
    return watch.new_batch(params.dataset, params.output, params.column_map)


@task(name="update-ledger", tags=["reflectune"])
def update_ledger(params: RecycleParams, batch: watch.Batch) -> int:
    return watch.record(params.output, batch)


def _earlier_run_active() -> str | None:
    """The name of an earlier run of this deployment that is still running, if any: a slow
    batch is never worked on by two scheduled runs at once (the later one steps aside)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import deployment, flow_run

    if not deployment.id:
        return None
    me = flow_run.id
    with get_client(sync_client=True) as client:
        mine = client.read_flow_run(me)
        running = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    earlier = [r for r in running if str(r.id) != str(me) and r.start_time and mine.start_time
               and (r.start_time, str(r.id)) < (mine.start_time, str(me))]
    return earlier[0].name if earlier else None


@flow(name="reflectune-rerecycle", log_prints=False)
def rerecycle(params: RecycleParams = RecycleParams(dataset="data/incoming", output="out/rerecycle")) -> dict[str, Any]:
    """Recycle the rows of a watched location that no earlier run has taken."""
    log = get_run_logger()
    busy = _earlier_run_active()
    if busy:
        log.info("run %s is still recycling %s: this run steps aside", busy, params.dataset)
        return {"status": "skipped: an earlier run is active", "watched": params.dataset}
    # the run's retries, as every flow applies them (tasks/retries.py)
    batch = with_retries(find_new_rows, params)(params)
    if batch is None:
        log.info("%s: nothing new since the last run", params.dataset)
        return {"status": "nothing new", "watched": params.dataset}
    log.info("%s: %d new rows in %d files (%d already recycled) -> %s", params.dataset, len(batch.keys),
             batch.files, batch.seen_rows, batch.output)
    run_params = params.model_copy(update={"dataset": batch.input, "output": batch.output, "limit": None})
    manifest = recycle(run_params)
    ledger_rows = with_retries(update_ledger, params)(params, batch)
    c = manifest["counts"]
    create_markdown_artifact(
        f"# Re-recycling {params.dataset}\n\n{len(batch.keys)} new rows ({batch.seen_rows} seen before) -> "
        f"`{batch.output}`: {c['selected_rows']} selected, {c['rejected_rows']} rejected. "
        f"The ledger now holds {ledger_rows} rows.\n",
        key="reflectune-rerecycle", description="Re-recycling batch")
    return {"status": "recycled", "batch": batch.name, "output": batch.output, "new_rows": len(batch.keys),
            "seen_rows": batch.seen_rows, "ledger_rows": ledger_rows, "counts": c}
