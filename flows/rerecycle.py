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

from flows.recycle import recycle
from reflectune import watch
from reflectune.config import RecycleParams


@task(name="find-new-rows", tags=["reflectune"], retries=3, retry_delay_seconds=[5, 20, 60])
def find_new_rows(params: RecycleParams) -> watch.Batch | None:
    return watch.new_batch(params.dataset, params.output, params.column_map)


@task(name="update-ledger", tags=["reflectune"], retries=3, retry_delay_seconds=[5, 20, 60])
def update_ledger(params: RecycleParams, batch: watch.Batch) -> int:
    return watch.record(params.output, batch)


@flow(name="reflectune-rerecycle", log_prints=False)
def rerecycle(params: RecycleParams = RecycleParams(dataset="data/incoming", output="out/rerecycle")) -> dict[str, Any]:
    """Recycle the rows of a watched location that no earlier run has taken."""
    log = get_run_logger()
    batch = find_new_rows(params)
    if batch is None:
        log.info("%s: nothing new since the last run", params.dataset)
        return {"status": "nothing new", "watched": params.dataset}
    log.info("%s: %d new rows in %d files (%d already recycled) -> %s", params.dataset, len(batch.keys),
             batch.files, batch.seen_rows, batch.output)
    run_params = params.model_copy(update={"dataset": batch.input, "output": batch.output, "limit": None})
    manifest = recycle(run_params)
    ledger_rows = update_ledger(params, batch)
    c = manifest["counts"]
    create_markdown_artifact(
        f"# Re-recycling {params.dataset}\n\n{len(batch.keys)} new rows ({batch.seen_rows} seen before) -> "
        f"`{batch.output}`: {c['selected_rows']} selected, {c['rejected_rows']} rejected. "
        f"The ledger now holds {ledger_rows} rows.\n",
        key="reflectune-rerecycle", description="Re-recycling batch")
    return {"status": "recycled", "batch": batch.name, "output": batch.output, "new_rows": len(batch.keys),
            "seen_rows": batch.seen_rows, "ledger_rows": ledger_rows, "counts": c}
