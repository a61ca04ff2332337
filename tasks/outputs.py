"""Whole-run tasks: intake and sharding, selection and outputs, training, the manifest."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from reflectune import card, evaluation, io, records, report, stages
from reflectune.config import RecycleParams
from reflectune.run_folder import RunFolder


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
    metrics = stages.train_selected(params)
    get_run_logger().info("training%s: %s", " (reused: the same pairs and settings trained before)"
                          if metrics["reused"] else "", metrics)
    return metrics


@task(name="write-manifest", tags=["reflectune"])
def write_manifest(params: RecycleParams, manifest: dict[str, Any]) -> str:
    """Written last: its presence means the run finished."""
    uri = RunFolder(params.output).manifest
    io.write_json(manifest, uri)
    return uri


@task(name="evaluate-students", tags=["reflectune", "train"])
def evaluate_students(params: RecycleParams) -> dict[str, Any]:
    """The baselines' students against the student trained on the selected data (reflectune.evaluation)."""
    summary = evaluation.evaluate_run(params)
    if summary.get("evaluated"):
        get_run_logger().info("%s", evaluation.render_table(summary))
    return summary


@task(name="train-baseline", tags=["reflectune", "train"])
def train_baseline(params: RecycleParams, kind: str) -> dict[str, Any]:
    """One baseline's student, trained on its own (reflectune.evaluation.train_baseline)."""
    result = evaluation.train_baseline(params, kind)
    get_run_logger().info("%s baseline: %d pairs, training %s", kind, result["rows"], result["training"])
    return result


@task(name="write-card", tags=["reflectune"])
def write_card(params: RecycleParams, manifest: dict[str, Any]) -> str:
    """The dataset card (README.md): the output folder loads with `datasets.load_dataset`."""
    out = RunFolder(params.output)
    decisions = records.read(out.decisions, records.DECISION, "dataset card")
    uri = out.card
    io.write_bytes(uri, card.render(manifest, decisions).encode("utf-8"))
    return uri


@task(name="write-report", tags=["reflectune"])
def write_report(params: RecycleParams, manifest: dict[str, Any]) -> str:
    evaluation = manifest.get("evaluation") if manifest.get("evaluation", {}).get("evaluated") else None
    return report.write(params.output, manifest, evaluation)
