"""The recycle flow: intake -> shards -> teacher and student work per shard -> join and
selection -> training -> manifest, with progress, table and summary artifacts.

Local mode runs the shard tasks in this process (a bounded number at a time; the worker's
engine is loaded once and reused). Cluster mode starts GPU batch flows on a work pool, one
per batch of shards, each loading its engine once, and a GPU step flow for training, each
baseline's training and the evaluation. Both run the same task code, and both
find their results in the output folder, so a rerun picks up whatever shards are done.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from reflectune import io, journal, lock, preflight, progress, stages
from reflectune import manifest as run
from reflectune.config import RecycleParams
from reflectune.engines import pool
from reflectune.errors import RESUME, BudgetExceededError, ReflectuneError
from reflectune.flows.cluster import batch_run_name, recorded_stop, step_run_name
from reflectune.run_folder import RunFolder
from reflectune.tasks.outputs import (evaluate_students, intake_and_shard, select_and_write, train_student,
                                      write_card, write_manifest, write_report)
from reflectune.tasks.retries import with_retries
from reflectune.tasks.shards import student_shard, teacher_shard


# threads for tasks at once; the flow bounds each stage below it (execution.max_workers, or
# teacher.concurrency shards waiting on a batch API)
@flow(name="reflectune-recycle", task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=False)
def recycle(params: RecycleParams = RecycleParams()) -> dict[str, Any]:
    """Recycle an instruction dataset with Selective Reflection-Tuning."""
    preflight.test_sets(params)  # a run started from the UI skips the command line's checks
    progress.stop_on_terminate()
    # one run at a time writes an output folder
    with lock.hold(params.output):
        return _pipeline(params)


def _pipeline(params: RecycleParams) -> dict[str, Any]:
    """The paper's pipeline: intake, reflect, score, select, train, evaluate, record."""
    log = get_run_logger()
    started = time.perf_counter()
    loads_before = len(pool.load_seconds)
    place = _Placement(params)

    summary = place.here(intake_and_shard)(params)
    progress.check()
    shards = summary["shards"]

    # the teacher reflects on every shard, the student scores every shard's variants
    try:
        results = place.shard_stages(shards, _Tracker(len(_stages(params)) * len(shards)))
    except BudgetExceededError as exc:
        raise _budget_stop(params, shards, exc) from None
    pool.close_all()  # the student engine is not needed past this point

    student_results = sorted((r for r in results if r["stage"] == "student"), key=lambda r: r["shard"])
    teacher_id = stages.teacher_identity(params.teacher) if params.selection.uses_teacher else None
    student_id = stages.model_identity(params.student)
    counts = place.here(select_and_write)(params, [r["uri"] for r in student_results], summary, teacher_id,
                                          student_id)

    train_metrics: dict[str, Any] = {"trained": False, "reason": "training disabled"}
    if params.training.enabled:
        train_metrics = place.on_gpu("train", train_student)

    evaluation: dict[str, Any] = {"evaluated": False, "reason": "evaluation disabled"}
    if params.evaluation.enabled and train_metrics.get("trained"):
        place.baselines()
        evaluation = place.on_gpu("evaluate", evaluate_students)
    elif params.evaluation.enabled:  # asked for, and nothing to evaluate: say why
        why = train_metrics.get("reason", "training did not run")
        evaluation["reason"] = f"not run: no student was trained ({why})"

    manifest = run.build(params, results, counts, train_metrics, evaluation, teacher=teacher_id, student=student_id,
                         scorer=stages.model_identity(params.scorer),
                         engine_loads=len(pool.load_seconds) - loads_before,
                         engine_load_seconds=sum(pool.load_seconds[loads_before:]),
                         seconds=time.perf_counter() - started,
                         journal=journal.spend(stages.journal_root(params)))
    manifest["report"] = place.here(write_report)(params, manifest)
    manifest["card"] = place.here(write_card)(params, manifest)
    place.here(write_manifest)(params, manifest)  # last: its presence means the run finished
    _artifacts(params, manifest)
    log.info("recycled %s -> %s: %d of %d valid samples selected", params.dataset, params.output,
             counts["selected_rows"], counts["valid_rows"])
    return manifest


class _Placement:
    """Where each step runs, and its retries: decided here, once. Local mode runs everything in
    this process (the shard tasks a bounded number at a time). Cluster mode runs the shard
    stages, training and evaluation as GPU batch runs on the GPU work pool, and the rest here;
    a teacher behind a batch API loads nothing and may wait a day, so its shards run here too,
    holding no GPU. Every step reads or writes the output location (maybe S3), so each retries
    on its own."""

    def __init__(self, params: RecycleParams):
        self.params = params
        self.cluster = params.execution.mode == "cluster"

    def here(self, task_fn):
        """`task_fn` in this process, with the run's retries."""
        return with_retries(task_fn, self.params)

    def shard_stages(self, shards: list[dict[str, Any]], tracker: _Tracker) -> list[dict[str, Any]]:
        if not self.cluster:
            return _run_local(self.params, shards, tracker)
        batched = self.params.selection.uses_teacher and self.params.teacher.batched
        results = _batch_api_teacher(self.params, shards, tracker) if batched else []
        return results + _run_cluster(self.params, shards, tracker, skip_teacher=batched)

    def baselines(self) -> None:
        """In cluster mode, each baseline's student trains as its own GPU step, side by side where
        workers allow; the evaluation then finds them trained. Locally the evaluation trains them."""
        if self.cluster:
            futures = [gpu_step_run.submit(self.params, "baseline", kind)
                       for kind in self.params.evaluation.baseline_kinds]
            for future in futures:
                future.result()

    def on_gpu(self, step: str, task_fn) -> dict[str, Any]:
        """A whole-run step that needs the device (training, evaluation): its result. In cluster
        mode it runs as a GPU step flow on the work pool."""
        if self.cluster:
            return gpu_step_run(self.params, step)
        return self.here(task_fn)(self.params)


def _budget_stop(params: RecycleParams, shards: list[dict[str, Any]], exc: BudgetExceededError) -> BudgetExceededError:
    """The budget's stop as the user reads it: the spend and the limit, the shards done and left,
    and how to go on."""
    done = sum(stages.finished(params, stages.Shard(**s), "teacher") is not None for s in shards)
    return BudgetExceededError(
        f"{exc}. Nothing more was sent; the teacher stage finished {done} of {len(shards)} shards, "
        f"{len(shards) - done} left. To go on, rerun the same command with a larger teacher.budget_tokens or "
        "teacher.budget_usd: every request the journal holds is replayed, none is paid for again")


class _Tracker:
    """Progress of the shard tasks: a Prefect progress artifact and the library's hook."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.artifact = create_progress_artifact(0.0, key="reflectune-recycle-progress",
                                                 description="Shard tasks finished (teacher and student)")

    def advance(self, result: dict[str, Any]) -> None:
        self.done += 1
        update_progress_artifact(self.artifact, 100.0 * self.done / max(self.total, 1))
        progress.report("shard", done=self.done, total=self.total, **{k: result[k] for k in ("shard", "stage", "reused")})


def _stages(params: RecycleParams) -> tuple[str, ...]:
    """The shard stages a method runs: cherry and superfilter have no teacher."""
    return ("teacher", "student") if params.selection.uses_teacher else ("student",)


def _run_local(params: RecycleParams, shards: list[dict[str, Any]], tracker: _Tracker) -> list[dict[str, Any]]:
    teacher = with_retries(teacher_shard, params)
    student = with_retries(student_shard, params)
    limit = params.execution.max_workers
    if not params.selection.uses_teacher:
        return _bounded(lambda s: student.submit(s, params), shards, limit, tracker)
    if params.teacher.batched:  # every shard's batches wait at the provider at once, then the student scores
        return (_batch_api_teacher(params, shards, tracker)
                + _bounded(lambda s: student.submit(s, params), shards, limit, tracker))
    if params.same_model:
        # one model serves both roles: each shard's scoring follows its reflection
        results: list[dict[str, Any]] = []
        for batch in _windows(shards, limit):
            teachers = [teacher.submit(s, params) for s in batch]
            students = [student.submit(s, params, wait_for=[t]) for s, t in zip(batch, teachers)]
            results += _collect(teachers + students, tracker)
        return results
    # two engines: every teacher shard first, then the teacher leaves the device to the student
    results = _bounded(lambda s: teacher.submit(s, params), shards, limit, tracker)
    pool.close_all()
    return results + _bounded(lambda s: student.submit(s, params), shards, limit, tracker)


def _batch_api_teacher(params: RecycleParams, shards: list[dict[str, Any]], tracker: _Tracker) -> list[dict[str, Any]]:
    """The teacher stage through a batch API, in this process: teacher.concurrency shards wait
    on their batches at once."""
    teacher = with_retries(teacher_shard, params)
    return _bounded(lambda s: teacher.submit(s, params), shards, params.teacher.concurrency, tracker)


def _windows(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _bounded(submit, items: list, limit: int, tracker: _Tracker) -> list[dict[str, Any]]:
    """Submit tasks with at most `limit` in flight, collecting the oldest first."""
    pending: list[PrefectFuture] = []
    results: list[dict[str, Any]] = []
    for item in items:
        if len(pending) >= limit:
            results += _collect([pending.pop(0)], tracker)
        pending.append(submit(item))
    return results + _collect(pending, tracker)


def _collect(futures: list[PrefectFuture], tracker: _Tracker) -> list[dict[str, Any]]:
    out = []
    for future in futures:
        result = future.result()  # raises if the task failed after its retries
        progress.check()  # the user asked to stop: no further shard starts
        tracker.advance(result)
        out.append(result)
    return out


def _run_cluster(params: RecycleParams, shards: list[dict[str, Any]], tracker: _Tracker,
                 skip_teacher: bool = False) -> list[dict[str, Any]]:
    batches = _windows(shards, params.execution.shards_per_batch)
    results = []
    for stage in _stages(params)[1:] if skip_teacher else _stages(params):
        futures = [gpu_batch_run.submit(params, stage, batch, i) for i, batch in enumerate(batches)]
        for future in futures:
            for result in future.result():
                tracker.advance(result)
                results.append(result)
    return results


@task(name="gpu-batch-run", tags=["reflectune"])
def gpu_batch_run(params: RecycleParams, stage: str, batch: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """One batch of shards for one stage on the GPU pool: the shards' results, read from the outputs."""
    _launch(params, params.execution.gpu_deployment, {"stage": stage, "shards": batch}, f"GPU batch {stage} #{index}",
            f"{stage}:{index}", batch_run_name(stage, batch))
    results = []
    for shard in batch:
        s = stages.Shard(**shard)
        result = stages.finished(params, s, stage)
        if result is None:
            raise ReflectuneError(f"GPU batch {stage} #{index} completed but {s.name}'s output "
                                  f"{stages.target(params, s, stage)} is not done")
        results.append(asdict(result) | {"reused": False})
    return results


@task(name="gpu-step-run", tags=["reflectune"])
def gpu_step_run(params: RecycleParams, step: str, baseline: str | None = None) -> dict[str, Any]:
    """Training, one baseline's training or the evaluation on the GPU pool: its result, read
    from the output folder."""
    label = f"GPU step {step}" + (f" ({baseline})" if baseline else "")
    _launch(params, params.execution.gpu_step_deployment, {"step": step, "baseline": baseline}, label,
            f"{step}:{baseline or ''}", step_run_name(step, baseline))
    folder = RunFolder(params.output)
    if step == "baseline":
        return io.read_json(folder.baseline_training(baseline))["baseline"]
    return io.read_json(folder.training if step == "train" else folder.evaluation)


def _launch(params: RecycleParams, deployment: str, parameters: dict[str, Any], label: str, key: str,
            name: str) -> None:
    """Run a GPU flow's deployment to its end.

    A run that crashed (its worker died: Prefect marks a run whose heartbeats stop as Crashed,
    see `reflectune cluster setup`) is launched again, up to `execution.retries` times, under a
    new idempotency key; a new batch run skips the shards the old one finished. A run that
    failed has already retried its tasks: its failure fails this run. A retried parent run
    (the UI's Retry) finds its earlier children by the same keys: one still running is waited
    for, one completed is taken as it is, and one that ended failed, cancelled or crashed is
    launched again under the next key. A run that stopped on an error no retry mends (a spent
    budget, an input fact) recorded it in the run folder under `name`: that error is raised here,
    as its own type."""
    from prefect.deployments import run_deployment

    log = get_run_logger()
    parent = flow_run.get_id() or "local"
    attempts, crashes = params.execution.retries + 1, 0
    for attempt in itertools.count():
        idempotency_key = f"{parent}:{key}:{attempt}"
        earlier = _ended_unfinished(idempotency_key)
        if earlier is not None:
            log.info("%s: flow run %s of an earlier try ended %s; launching it again", label, earlier.id,
                     earlier.state.name)
            continue
        child = run_deployment(name=deployment, parameters=parameters | {"params": params.model_dump(mode="json")},
                               timeout=None, idempotency_key=idempotency_key)
        if child.state and child.state.is_completed():
            return
        state = child.state.name if child.state else "without a state"
        why = (child.state.message or "") if child.state else ""
        stopped = recorded_stop(params, name)
        if stopped is not None and not (child.state and child.state.is_crashed()):
            raise stopped
        if not (child.state and child.state.is_crashed()):
            raise ReflectuneError(f"{label} (flow run {child.id}) ended {state}: {why}")
        crashes += 1
        log.warning("%s (flow run %s) ended %s (attempt %d of %d): %s", label, child.id, state, crashes, attempts,
                    why)
        if crashes == attempts:
            raise ReflectuneError(f"{label} crashed in {attempts} attempts: its workers died. {RESUME}")


def _ended_unfinished(idempotency_key: str):
    """The flow run started under this key by an earlier try of this run, where it ended
    failed, cancelled or crashed; None where there is none, or it is running or completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            idempotency_key=FlowRunFilterIdempotencyKey(any_=[idempotency_key])))
    return next((r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()), None)


def _artifacts(params: RecycleParams, manifest: dict[str, Any]) -> None:
    rows = [
        {"shard": r["shard"], "stage": r["stage"], "rows": r["rows"], "reused": r["reused"],
         "seconds": round(r["seconds"], 2), **{k: v for k, v in r["detail"].items()}}
        for r in manifest["shard_results"]
    ]
    create_table_artifact(rows, key="reflectune-shards", description="Per-shard counts and timings")
    create_markdown_artifact(run.markdown(manifest), key="reflectune-summary", description="Recycle run summary")

