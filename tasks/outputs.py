"""Whole-run tasks: intake and sharding, selection and outputs, training, the manifest."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from reflectune import card, io, records, report, stages, training
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
    pairs = records.read(io.join(params.output, "selected.parquet"), records.SELECTED, "training").select(
        "instruction", "input", "output")
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


@task(name="evaluate-students", tags=["reflectune", "train"])
def evaluate_students(params: RecycleParams) -> dict[str, Any]:
    """Train a baseline student on as many original pairs as were selected, then judge the
    student trained on the selected data against it (reflectune.evaluation)."""
    import polars as pl

    from reflectune import evaluation

    ev = params.evaluation
    out = params.output
    selected = records.read(io.join(out, "selected.parquet"), records.SELECTED, "evaluation")
    originals = records.read(io.join(out, "decisions.parquet"), records.DECISION, "evaluation").select(
        instruction="orig_instruction", input="orig_input", output="orig_output")
    budget = originals.sample(n=min(selected.height, originals.height), seed=ev.seed, shuffle=True)
    baseline_dir = io.join(out, "baseline-model")
    metrics = training.train(budget, params.student, params.training, baseline_dir)
    if not metrics.get("trained"):
        return {"evaluated": False, "reason": f"baseline not trained: {metrics.get('reason')}"}
    tests = evaluation.load_test_set(ev.test_set)[: ev.limit]
    result = evaluation.evaluate(io.join(out, "model"), baseline_dir, ev.judge, tests,
                                 template=params.student.template, judge_engine=ev.judge_engine,
                                 judge_base_url=ev.judge_base_url, max_new_tokens=ev.max_new_tokens,
                                 max_length=params.student.max_length)
    records.write(pl.DataFrame(result.rows), io.join(out, "evaluation.parquet"))
    summary = {"evaluated": True, **result.summary, "baseline_training": metrics}
    io.write_json(summary, io.join(out, "evaluation.json"))
    get_run_logger().info("%s", evaluation.render_table(summary))
    return summary


@task(name="write-card", tags=["reflectune"])
def write_card(params: RecycleParams, manifest: dict[str, Any]) -> str:
    """The dataset card (README.md): the output folder loads with `datasets.load_dataset`."""
    decisions = records.read(io.join(params.output, "decisions.parquet"), records.DECISION, "dataset card")
    uri = io.join(params.output, "README.md")
    io.write_bytes(uri, card.render(manifest, decisions).encode("utf-8"))
    return uri


@task(name="write-report", tags=["reflectune"])
def write_report(params: RecycleParams, manifest: dict[str, Any]) -> str:
    evaluation = manifest.get("evaluation") if manifest.get("evaluation", {}).get("evaluated") else None
    return report.write(params.output, manifest, evaluation)
