"""Whole-run tasks: intake and sharding, selection and outputs, training, the manifest."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from reflectune import io, stages, training
from reflectune.config import RecycleParams


@task(name="intake-and-shard", tags=["reflectune"])
def intake_and_shard(params: RecycleParams) -> dict[str, Any]:
    summary = stages.shard_dataset(params)
    get_run_logger().info(
        "%s: %d input rows, %d valid in %d shards, %d rejected (%d duplicates)", params.dataset,
        summary["input_rows"], summary["valid_rows"], len(summary["shards"]), summary["rejected_rows"],
        summary["duplicate_rows"])
    return summary


@task(name="select-and-write", tags=["reflectune"])
def select_and_write(params: RecycleParams, score_uris: list[str], summary: dict[str, Any],
                     teacher_id: str, student_id: str) -> dict[str, Any]:
    counts = stages.select_and_write(params, score_uris, summary, teacher_id, student_id)
    get_run_logger().info("selection (%s): %d of %d valid samples selected; %s", params.selection.mode,
                          counts["selected_rows"], counts["valid_rows"], counts["per_branch"])
    return counts


@task(name="train-student", tags=["reflectune", "train"])
def train_student(params: RecycleParams) -> dict[str, Any]:
    pairs = io.read_parquet(io.join(params.output, "selected.parquet")).select("instruction", "input", "output")
    metrics = training.train(pairs, params.student, params.training, io.join(params.output, "model"))
    io.write_json(metrics, io.join(params.output, "training.json"))
    get_run_logger().info("training: %s", metrics)
    return metrics


@task(name="write-manifest", tags=["reflectune"])
def write_manifest(params: RecycleParams, manifest: dict[str, Any]) -> str:
    """Written last: its presence means the run finished."""
    uri = io.join(params.output, "manifest.json")
    io.write_json(manifest, uri)
    return uri
