"""Deployments on a real Prefect server with real process workers: a worker killed mid-run,
scheduled re-recycling, and the deployment files themselves."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from reflectune.testing.servers import Cluster, api, write_rows

from ..conftest import ROOT, SAMPLE

CHROMIUM = os.environ.get("REFLECTUNE_CHROMIUM", "/usr/bin/chromium")
# the GPU batch runs beat every 30 s (the deployment file's, Prefect's least) and are Crashed
# 20 s after a missed beat: the killed worker's run is found in 20-50 s rather than the default 90
HEARTBEAT, GRACE = 30, 20
FAST = {"teacher": {"max_new_tokens": 8}, "selection": {"mode": "paper"}, "training": {"enabled": False}}


@pytest.fixture(scope="module")
def cluster(prefect_server, tmp_path_factory):
    c = Cluster(prefect_server, tmp_path_factory.mktemp("cluster"), ROOT)
    try:
        assert "work pools created: reflectune, gpu" in c.deploy(heartbeat=HEARTBEAT, grace=GRACE)
        yield c
    finally:
        c.stop()


def runs_of(client, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def patiently(call, *args, tries: int = 8):
    """An API call retried while the server answers 503: a SQLite-backed Prefect server
    answers so when its database is briefly locked by its own services."""
    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(tries):
        try:
            return call(*args)
        except PrefectHTTPStatusError as e:
            if e.response.status_code != 503 or attempt == tries - 1:
                raise
            time.sleep(3)


def wait_until(check, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def sample(n: int, start: int = 0) -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()][start : start + n]


def test_deployments_are_on_the_server_with_their_pools(cluster):
    with api(cluster) as client:
        names = {(d.name, d.work_pool_name) for d in client.read_deployments()}
        recycle = client.read_deployment_by_name("reflectune-recycle/recycle")
        rerecycle = client.read_deployment_by_name("reflectune-rerecycle/re-recycle")
        gpu = client.read_deployment_by_name("reflectune-gpu-batch/gpu")
        step = client.read_deployment_by_name("reflectune-gpu-step/gpu-step")
        automations = client.read_automations_by_name("reflectune: crash runs whose heartbeats stopped")
    assert {("recycle", "reflectune"), ("re-recycle", "reflectune"), ("gpu", "gpu"), ("gpu-step", "gpu")} <= names
    # the UI form comes from the parameter model: descriptions and defaults
    props = recycle.parameter_openapi_schema["definitions"]["RecycleParams"]["properties"]
    assert "Records per Parquet shard" in props["shard_size"]["description"] and props["shard_size"]["default"] == 512
    assert recycle.parameters["params"]["execution"]["mode"] == "cluster"
    [schedule] = rerecycle.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.active
    assert schedule.parameters["params"]["dataset"] == str(cluster.watch)
    # the GPU runs beat as often as the automation expects
    assert gpu.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT)
    assert step.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT)
    assert len(automations) == 1 and automations[0].trigger.within == timedelta(seconds=HEARTBEAT + GRACE)
    # only GPU runs are crashed by it: the orchestrating run's late heartbeat is left alone
    related = automations[0].trigger.match_related
    related = related[0] if isinstance(related, list) else related
    assert dict(getattr(related, "root", related)) == {"prefect.resource.role": "flow",
                                                      "prefect.resource.name": ["reflectune-gpu-batch",
                                                                                "reflectune-gpu-step"]}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scheduled_rerecycling_takes_only_new_rows(cluster):
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    write_rows(cluster.watch / "part-1.jsonl", sample(3, 20))
    params = {"dataset": str(cluster.watch), "output": str(cluster.rerecycle_out), "shard_size": 2, **FAST}
    root = cluster.rerecycle_out
    with api(cluster) as client:
        dep = client.read_deployment_by_name("reflectune-rerecycle/re-recycle")
        # a short interval for the test, its first run due in 5 s, with few runs queued ahead so
        # they do not pile up (a run due while a batch still runs steps aside)
        interval = timedelta(seconds=20)
        [schedule] = client.create_deployment_schedules(dep.id, [DeploymentScheduleCreate(
            schedule=IntervalSchedule(interval=interval, anchor_date=datetime.now(UTC) - interval + timedelta(seconds=5)),
            active=True, max_scheduled_runs=2, parameters={"params": params})])
        try:
            def batches() -> list[Path]:
                return sorted(p.parent for p in (root / "runs").glob("*/manifest.json")) if root.exists() else []

            def ledger_rows() -> int:
                path = root / "ledger.parquet"
                return pl.read_parquet(path).height if path.exists() else 0

            wait_until(lambda: len(batches()) == 1 and ledger_rows() == 3, 400, "the first scheduled batch")
            first = batches()[0]
            before = _fingerprint(first) | {f"inputs/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                                            for p in (root / "inputs").iterdir()}
            # two new rows, and one row the first batch already took
            write_rows(cluster.watch / "part-2.jsonl", [*sample(2, 30), sample(1, 20)[0]])
            wait_until(lambda: len(batches()) == 2 and ledger_rows() == 5, 400, "the second scheduled batch")
        finally:
            patiently(client.delete_deployment_schedule, dep.id, schedule.id)
            for queued in patiently(runs_of, client, "reflectune-rerecycle/re-recycle"):
                if queued.state and queued.state.is_scheduled():  # runs created ahead: not for the next tests
                    patiently(client.delete_flow_run, queued.id)
            # a run the worker already took finds nothing new (or steps aside): let it end here,
            # not beside the next test's run
            wait_until(lambda: all(r.state and (r.state.is_final() or r.state.is_scheduled())
                                   for r in patiently(runs_of, client, "reflectune-rerecycle/re-recycle")),
                       120, "the re-recycle runs already started")
        runs = runs_of(client, "reflectune-rerecycle/re-recycle")

    second = next(b for b in batches() if b != first)
    m1 = json.loads((first / "manifest.json").read_text())
    m2 = json.loads((second / "manifest.json").read_text())
    assert m1["counts"]["input_rows"] == 3 and m2["counts"]["input_rows"] == 2
    new_instructions = {r["instruction"] for r in sample(2, 30)}
    shards = pl.concat([pl.read_parquet(p) for p in (second / "shards").glob("*.parquet")])
    assert set(shards["instruction"]) == new_instructions
    assert pl.read_parquet(second / "decisions.parquet").height == 2
    after = _fingerprint(first) | {f"inputs/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                                   for p in (root / "inputs").iterdir() if f"inputs/{p.name}" in before}
    assert after == before  # the earlier batch's outputs are untouched
    assert all(r.auto_scheduled for r in runs if r.state and r.state.is_completed())
    assert len([r for r in runs if r.state and r.state.is_completed()]) >= 2


def test_a_run_started_from_the_ui_survives_a_killed_worker(cluster, tmp_path):
    """Headless Chromium fills the recycle deployment's custom-run form (the form the parameter
    model gives): 4 shards in 4 batches of 2 on two GPU-pool workers, then the student's training as
    a GPU step run. Mid-run, the worker running a batch is SIGKILLed with its children. Its run
    is marked Crashed when heartbeats stop, the batch is launched again on the other worker, and
    every sample ends once in the outputs."""
    import re

    from playwright.sync_api import sync_playwright

    data, out = tmp_path / "ui.jsonl", tmp_path / "ui-out"
    write_rows(data, sample(4, 10))
    shots = ROOT / "out" / "test-artifacts"
    shots.mkdir(parents=True, exist_ok=True)
    with api(cluster) as client:
        dep = client.read_deployment_by_name("reflectune-recycle/recycle")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        refused: list[str] = []  # API answers that the UI would show as a toast
        page.on("response", lambda r: r.status >= 400 and "/api/" in r.url and refused.append(
            f"{r.request.method} {r.url} -> {r.status}"))
        page.on("pageerror", lambda e: refused.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and refused.append(f"console: {m.text[:500]}"))
        page.goto(f"{cluster.server['ui']}/deployments/deployment/{dep.id}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()

        def field(label: str, within=None):
            """The innermost form property whose label starts with `label` (inside `within`)."""
            scope = within or page
            name = page.locator(".schema-form-property__label", has_text=re.compile(f"^{label}"))
            return scope.locator(".schema-form-property", has=name).last

        field("Dataset").locator("textarea").fill(str(data))
        field("Output").locator("textarea").fill(str(out))
        field("Shard Size").locator("input").fill("1")
        field("Max New Tokens", within=field("Teacher")).locator("input").fill("8")
        field("Shards Per Batch").locator("input").fill("2")
        # training stays as the form has it (on): the student trains as a GPU step run
        with api(cluster) as client:
            before = {r.id for r in runs_of(client, "reflectune-recycle/recycle")}
            started = []
            for _ in range(3):
                page.get_by_role("button", name="Submit").click()
                try:
                    started = wait_until(lambda: [r for r in runs_of(client, "reflectune-recycle/recycle")
                                                  if r.id not in before], 40, "the run the form started")
                    break
                except AssertionError:
                    # the UI says "Something went wrong" when the server was busy (a SQLite-backed
                    # server answers 503 while its services hold the database): submit again, as
                    # a user would, once no run has appeared
                    page.screenshot(path=str(shots / "ui-submit-failed.png"), full_page=True)
            assert started, f"the form started no run after three submissions: {refused}"
            parent = started[0]

            def running_batch_after_a_shard():
                variants = out / "variants"
                if not (variants.exists() and list(variants.glob("*.parquet.json"))):
                    return None
                for run in runs_of(client, "reflectune-gpu-batch/gpu"):
                    if run.state and run.state.is_running():
                        worker = cluster.worker_running(str(run.id))
                        if worker:
                            return run, worker
                return None

            victim_run, victim = wait_until(running_batch_after_a_shard, 400,
                                            "a GPU batch running after a finished shard", every=0.5)
            cluster.kill_worker(victim)

            def finished():
                return wait_until(lambda: (r := client.read_flow_run(parent.id)).state.is_final() and r, 600,
                                  "the recycle run to finish", every=3)

            final = finished()
            if final.state.is_crashed():
                # on a loaded machine the orchestrating run's own heartbeats can arrive late and the
                # automation crashes it; its retry (the UI's Retry) resumes from the finished shards
                from prefect.states import AwaitingRetry

                client.set_flow_run_state(parent.id, AwaitingRetry(), force=True)
                wait_until(lambda: not client.read_flow_run(parent.id).state.is_final(), 60, "the retry to start")
                final = finished()
            crashed = client.read_flow_run(victim_run.id)
            batches = [r for r in runs_of(client, "reflectune-gpu-batch/gpu")
                       if r.parameters["params"]["output"] == str(out)]
            steps = [r for r in runs_of(client, "reflectune-gpu-step/gpu-step")
                     if r.parameters["params"]["output"] == str(out)]
        page.goto(f"{cluster.server['ui']}/runs/flow-run/{parent.id}")
        page.wait_for_load_state("networkidle")
        page.get_by_text("Completed").first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "ui-run-page.png"), full_page=True)
        browser.close()

    assert final.state.is_completed(), final.state.message
    params = final.parameters["params"]
    assert (params["dataset"], params["output"], params["shard_size"]) == (str(data), str(out), 1)
    assert params["teacher"]["max_new_tokens"] == 8 and params["training"]["enabled"] is True
    assert crashed.state.type.value == "CRASHED"
    # 2 teacher and 2 student batches, plus at least one relaunch of the crashed one (on a loaded
    # machine a live batch whose heartbeat came late may be crashed and relaunched too: its shards
    # are done once either way, as the outputs below show)
    assert len([r for r in batches if r.state.is_completed()]) >= 4 and len(batches) >= 5

    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert manifest["shards"] == 4 and (c["input_rows"], c["valid_rows"]) == (4, 4)
    assert c["selected_rows"] + c["dropped_rows"] == c["valid_rows"]
    assert manifest["parameters"]["teacher"]["max_new_tokens"] == 8
    decisions = pl.read_parquet(out / "decisions.parquet")
    expected = set(pl.concat([pl.read_parquet(p) for p in (out / "shards").glob("*.parquet")])["sample_id"])
    assert decisions.height == 4 and set(decisions["sample_id"]) == expected  # none missing, none twice
    assert len(list((out / "scores").glob("*.parquet"))) == 4 and len(list((out / "variants").glob("*.parquet"))) == 4
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected["sample_id"].n_unique() == selected.height == c["selected_rows"]
    # training ran as a run of the GPU step flow on the GPU pool (no shard batch carries it), and
    # its result is the manifest's
    assert [r.parameters["step"] for r in steps if r.state.is_completed()] == ["train"]
    assert {r.parameters["stage"] for r in batches} == {"teacher", "student"}
    assert manifest["training"] == json.loads((out / "training.json").read_text())
    assert manifest["training"]["trained"] == (c["selected_rows"] > 0) == (out / "model").is_dir()

    from PIL import Image, ImageStat

    image = Image.open(shots / "ui-run-page.png").convert("L")
    assert image.width >= 1400 and max(ImageStat.Stat(image).stddev) > 10  # drawn, not blank
