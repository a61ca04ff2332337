"""The recycle flow on a real Prefect API with the packaged model."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from reflectune.config import RecycleParams
from reflectune.evaluation import BUNDLED_TEST_SET
from reflectune.records import SCORE_COLUMNS
from reflectune.selection import select

from ..conftest import ROOT, SAMPLE
from ..fault_proxy import FaultProxy

TINY_TRAIN = {"epochs": 1, "batch_size": 4, "per_device_batch_size": 2, "learning_rate": 1e-4, "max_length": 256}


def dataset(tmp_path, extra_rows=()):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:5]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]))
    return str(path)


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs(flow_run_id, expect: dict[str, int], timeout: float = 60.0):
    """The flow run's task runs once the server has recorded them: at least `expect[name]` runs
    of each task, every one in a final state. Prefect records task runs from the events the
    flow emits, which a busy server may process after the flow has returned; past `timeout`,
    what is there is returned for the test to judge."""
    import time
    from collections import Counter

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with client() as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        have = Counter(t.name.rsplit("-", 1)[0] for t in runs)
        recorded = all(have[name] >= n for name, n in expect.items())
        if (recorded and all(t.state is not None and t.state.is_final() for t in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_an_evaluation_asked_for_with_nothing_selected_says_why_it_did_not_run(prefect_api, tmp_path):
    """--evaluate with a budget that keeps none of 3 rows: no student trains, and the summary
    says so, not "evaluation disabled"."""
    from reflectune import manifest as run
    from reflectune.flows.recycle import recycle

    manifest = recycle(RecycleParams(dataset=dataset(tmp_path), output=str(tmp_path / "out"), limit=3, shard_size=3,
                                     selection={"method": "cherry", "budget": 0.1}, training=TINY_TRAIN,
                                     evaluation={"enabled": True}, execution={"retries": 0}))
    assert manifest["counts"]["selected_rows"] == 0
    assert manifest["evaluation"] == {"evaluated": False, "reason": "not run: no student was trained (no selected "
                                                                    "rows to train on)"}
    assert "evaluation: not run: no student was trained" in run.text(manifest)


@pytest.mark.fast
def test_a_tiny_run_in_local_mode(prefect_api, tmp_path):
    """The fast tier's flow run: 3 rows in 2 shards, the packaged model as teacher and student
    in this process, every task of the local mode once per shard or run; each row ends in the
    decisions once, and the run folder holds what the manifest says."""
    from reflectune.flows.recycle import recycle

    out = tmp_path / "out"
    state = recycle(RecycleParams(dataset=dataset(tmp_path), output=str(out), limit=3, shard_size=2,
                                  teacher={"max_new_tokens": 4}, training={"enabled": False},
                                  execution={"retries": 0}), return_state=True)
    assert state.is_completed()
    manifest = state.result()
    assert (manifest["shards"], manifest["counts"]["input_rows"], manifest["counts"]["valid_rows"]) == (2, 3, 3)
    assert manifest["engine_loads"] == 2  # the teacher's and the student's, each loaded once for both shards
    names = sorted(t.name.rsplit("-", 1)[0] for t in task_runs(
        state.state_details.flow_run_id, {"teacher-shard": 2, "student-shard": 2, "write-manifest": 1}))
    assert names == sorted(["intake-and-shard", "teacher-shard", "teacher-shard", "student-shard", "student-shard",
                            "select-and-write", "write-report", "write-card", "write-manifest"]), names
    decisions = pl.read_parquet(out / "decisions.parquet")
    assert sorted(decisions["source_index"].to_list()) == [0, 1, 2]
    assert decisions["chosen"].drop_nulls().len() == manifest["counts"]["selected_rows"]
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
    assert len(list((out / "variants").glob("*.parquet"))) == len(list((out / "scores").glob("*.parquet"))) == 2


def test_the_whole_flow_on_a_few_rows(prefect_api, tmp_path):
    from reflectune.flows.recycle import recycle

    bad = [{"instruction": "No answer"}, json.loads(SAMPLE.read_text().splitlines()[0])]  # a bad row, a duplicate
    koala = tmp_path / "koala_test_set.jsonl"  # a second test set, in Koala's form
    koala.write_text(json.dumps({"prompt": "Name a colour.", "id": "k1"}) + "\n")
    params = RecycleParams(
        dataset=dataset(tmp_path, bad), output=str(tmp_path / "out"), shard_size=2,
        teacher={"max_new_tokens": 12}, selection={"mode": "paper"}, training=TINY_TRAIN,
        evaluation={"enabled": True, "limit": 1, "max_new_tokens": 8, "baselines": "random,ifd",
                    "test_sets": f"{BUNDLED_TEST_SET},{koala}"},
    )
    state = recycle(params, return_state=True)
    assert state.is_completed()
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert (c["input_rows"], c["valid_rows"], c["rejected_rows"], c["duplicate_rows"]) == (7, 5, 2, 1)
    assert c["valid_rows"] + c["rejected_rows"] == c["input_rows"]
    assert c["selected_rows"] + c["dropped_rows"] == c["valid_rows"]
    assert manifest["shards"] == 3 and len(manifest["shard_results"]) == 6
    assert manifest["token_usage"]["completion_tokens"] > 0
    assert manifest["parameters"]["teacher"]["max_new_tokens"] == 12
    # 4 variants x 4 sequences per sample; copies (the shared direct instruction at least) scored once
    scoring = manifest["scoring"]
    assert scoring["sequences"] <= 16 * 5 and scoring["sequences_scored"] < scoring["sequences"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    decisions = pl.read_parquet(out / "decisions.parquet")
    assert decisions.height == 5 and decisions["sample_id"].n_unique() == 5
    for variant in ("orig", "ins", "res", "ins_res"):
        assert {f"{variant}_ifd_ppl", f"{variant}_rifd_ppl", f"{variant}_output"} <= set(decisions.columns)
    assert decisions["reason"].null_count() == 0 and set(decisions["branch"]) <= {"orig", "ins", "res", "ins_res"}

    selected = pl.read_parquet(out / "selected.parquet")
    assert selected.height == c["selected_rows"]
    assert {"sample_id", "source_index", "variant", "teacher", "student", "prompt_version", *SCORE_COLUMNS} <= set(selected.columns)
    # the teacher named one way everywhere: its variants' rows, the selection, the manifest
    variants = pl.concat([pl.read_parquet(p) for p in (out / "variants").glob("*.parquet")])
    assert set(variants["teacher"]) == {manifest["teacher"]} and set(selected["teacher"].drop_nulls()) <= {manifest["teacher"]}
    assert manifest["teacher"].startswith("transformers:packaged:")
    lines = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == selected.height and all(set(line) == {"instruction", "input", "output"} for line in lines)
    rejected = pl.read_parquet(out / "rejected.parquet")
    assert rejected["source_index"].to_list() == [5, 6] and "duplicate of line 1" in rejected["reason"][1]

    assert manifest["training"]["trained"] and manifest["training"]["rows"] == c["selected_rows"] > 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").num_parameters() > 1e8

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with client() as cl:
        # this run's: other tests in the session run flows that write the same keys
        this_run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        arts = cl.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["reflectune-shards", "reflectune-summary"]), flow_run_id=this_run))
        assert {a.key for a in arts} == {"reflectune-shards", "reflectune-summary"}
        # progress inside each shard: a progress artifact per shard and stage, finished, with its rate
        inside = cl.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"reflectune-{stage}-part-0000{i}" for stage in ("teacher", "student")
                                        for i in range(3)]), flow_run_id=this_run))
        assert len({a.key for a in inside}) == 6 and all(a.data == 100.0 for a in inside)
        teacher_done = next(a for a in inside if a.key == "reflectune-teacher-part-00000").description
        # the planned total is three generations a row, and grows by the retries scheduled
        done = re.search(r"teacher part-00000: done, (\d+) of (\d+) generations, [\d,]+ tok/s", teacher_done)
        assert done and int(done[1]) == int(done[2]) >= 6, teacher_done
        summary = next(a for a in arts if a.key == "reflectune-summary").data
    wanted = {"intake-and-shard", "teacher-shard", "student-shard", "select-and-write", "write-manifest", "write-report"}
    runs = {t.name.rsplit("-", 1)[0] for t in task_runs(state.state_details.flow_run_id,
                                                           dict.fromkeys(wanted, 1) | {"teacher-shard": 3, "student-shard": 3})}
    assert wanted <= runs
    assert f"file://{out / 'report.html'}" in summary

    # the evaluation stage: two baseline students, each judged against the selected data's on two
    # test sets (the length baseline's set: tests/test_evaluation.py)
    ev = manifest["evaluation"]
    assert ev["evaluated"] and sorted(ev["baselines"]) == ["ifd", "random"]
    trained = [k for k in ev["baselines"] if (out / "baselines" / f"{k}-model" / "config.json").exists()]
    assert len(trained) == 2 and all(ev["baselines"][k]["training"]["trained"] for k in trained)
    table = pl.read_parquet(out / "evaluation-table.parquet")
    assert table.select("baseline", "test_set").rows() == [(k, t) for k in ("random", "ifd")
                                                          for t in ("test_set", "koala_test_set")]
    assert (table["n"] == 1).all() and (table["wins"] + table["ties"] + table["losses"] == 1).all()
    assert table.to_dicts() == ev["table"]
    # the sets: as many pairs as were selected; Cherry's rule on the run's own scores
    sets = {k: pl.read_parquet(out / "baselines" / f"{k}.parquet") for k in trained}
    assert sets["random"].height == ev["baselines"]["random"]["rows"] == c["selected_rows"]
    cherry = select(decisions, method="cherry", budget=c["selected_rows"] / decisions.height)
    assert set(sets["ifd"]["sample_id"]) == set(cherry.filter(pl.col("selected"))["sample_id"])
    # a trained baseline is reused (a rerun, or the cluster's evaluation after the baselines' own runs)
    from reflectune import evaluation

    assert evaluation.train_baseline(params, "random") == ev["baselines"]["random"]
    verdicts = pl.read_parquet(out / "evaluation.parquet")
    first = verdicts.filter((pl.col("baseline") == "random") & (pl.col("test_set") == "test_set"))
    assert verdicts.height == 4 and first["outcome"][0] == ["loss", "tie", "win"][int(ev["table"][0]["winning_score"])]
    assert "winning score" in summary
    check_report_in_chromium(out / "report.html", evaluated=True)


def check_report_in_chromium(report, evaluated: bool) -> None:
    """Every plot of the report is drawn: each SVG, screenshotted alone, decodes and is not blank."""
    import io as _io

    from PIL import Image
    from playwright.sync_api import sync_playwright

    shots = ROOT / "out" / "test-artifacts"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("REFLECTUNE_CHROMIUM", "/usr/bin/chromium"),
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(f"file://{report}")
        page.screenshot(path=str(shots / "report.png"), full_page=True)
        plots = page.locator("svg.plot")
        # IFD and r-IFD for four variants, the scatter, the branches; the evaluation's winning scores
        assert plots.count() == 10 + evaluated
        for i in range(plots.count()):
            image = Image.open(_io.BytesIO(plots.nth(i).screenshot())).convert("RGB")
            assert image.width > 100 and image.height > 50
            assert len(image.getcolors(1 << 20) or []) > 3, f"plot {i} is blank"
        text = page.inner_text("body")
        browser.close()
    for heading in ("IFD per variant", "IFD against r-IFD", "Selection branches", "Teacher rewrites: usable or fallen back",
                    "Token usage and cost", "Most and least helpful rewrites"):
        assert heading in text
    assert ("Evaluation" in text) == evaluated
    # the most helpful rewrites are usable ones, or the report says there is none
    decisions = pl.read_parquet(report.parent / "decisions.parquet")
    usable = decisions.filter((pl.col("ins_res_parse_status") == "ok") & pl.col("ins_res_ifd_ppl").is_finite()
                              & pl.col("orig_ifd_ppl").is_finite())
    assert ("Most helpful" in text) == (usable.height > 0)
    assert ("No usable rewrite has both scores" in text) == (usable.height == 0)


def test_a_shard_task_that_fails_twice_is_retried(prefect_api, vllm_server, tmp_path):
    """The teacher endpoint fails the shard's first two attempts (503, with no request retries
    left); the third passes. A refused key (401) is not retried: no retry can mend it."""
    from reflectune.flows.recycle import recycle

    proxy = FaultProxy("127.0.0.1", vllm_server["port"], ["401"])
    try:
        params = RecycleParams(
            dataset=dataset(tmp_path), output=str(tmp_path / "out"), limit=2, shard_size=2,
            teacher={"engine": "openai", "model": vllm_server["model"], "base_url": f"{proxy.url}/v1",
                     "max_new_tokens": 16, "concurrency": 1, "request_retries": 0},
            training={"enabled": False}, execution={"retries": 2, "retry_delay_seconds": 0},
        )
        refused = recycle(params, return_state=True)
        assert refused.is_failed() and "answered 401" in refused.message and proxy.log == ["401"]
        proxy.set_faults(["503", "503"])
        state = recycle(params, return_state=True)
    finally:
        proxy.close()
    assert state.is_completed()
    assert proxy.log[:2] == ["503", "503"] and proxy.log[2:] and set(proxy.log[2:]) == {"pass"}
    teacher_runs = [t for t in task_runs(state.state_details.flow_run_id, {"teacher-shard": 1})
                    if t.name.startswith("teacher-shard")]
    assert len(teacher_runs) == 1 and teacher_runs[0].run_count == 3 and teacher_runs[0].state.is_completed()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["valid_rows"] == 2 and manifest["teacher"].startswith("openai:smollm2@")


def cli(argv, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "reflectune.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_run_whose_teacher_is_down_fails_then_resumes(prefect_api, vllm_server, tmp_path):
    """Nothing listens at the teacher's address: the run fails within its retries, names the
    endpoint and the shard, marks nothing done and writes no selection. With a server on that
    address, the same command completes and every row has real teacher text."""
    from prefect.settings import PREFECT_API_URL

    from reflectune.testing.servers import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    settings = tmp_path / "params.json"
    settings.write_text(json.dumps({"execution": {"retries": 1, "retry_delay_seconds": 0}}))
    out = tmp_path / "out"
    argv = ["recycle", dataset(tmp_path), "--out", str(out), "--limit", "2", "--shard-size", "1",
            "--teacher-engine", "openai", "--teacher", vllm_server["model"], "--base-url", url,
            "--request-retries", "1", "--max-new-tokens", "16", "--no-train", "--params", str(settings)]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    failed = cli(argv, env)
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("reflectune: error: the teacher stage failed on shard part-00000: TeacherUnavailableError")
    assert f"teacher endpoint {url} (model 'smollm2') did not answer in 2 attempts" in last
    assert "rerun the same command" in last
    assert not list(out.glob("variants/*.json")) and not list(out.glob("variants/*.parquet"))
    assert not (out / "decisions.parquet").exists() and not (out / "selected.jsonl").exists()
    assert not (out / "manifest.json").exists()

    proxy = FaultProxy("127.0.0.1", vllm_server["port"], port=port)  # the endpoint is back
    try:
        done = cli(argv, env)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 input rows: 2 valid" in done.stderr and "Method selective (released rule): teacher openai:smollm2@" in done.stderr
    assert "pass" in proxy.log
    variants = pl.concat([pl.read_parquet(p) for p in out.glob("variants/*.parquet")])
    assert variants.height == 6 and variants["completion_tokens"].min() > 0
    assert not any(t.startswith("[request failed") for texts in variants["raw_text"] for t in texts)
    assert json.loads((out / "manifest.json").read_text())["counts"]["valid_rows"] == 2


class FailsMidShardOnce:
    """The real scorer with a fault at the engine boundary: the first call in the test scores
    half its sequences, then raises, as an engine that died mid-shard."""

    def __init__(self, engine, state):
        self.engine, self.state = engine, state
        self.tokenizer, self.max_sequence = engine.tokenizer, engine.max_sequence

    def token_nll(self, seqs, progress=None):
        if not self.state["failed"]:
            self.state["failed"] = True
            self.engine.token_nll(seqs[: len(seqs) // 2], progress)
            raise RuntimeError("injected: the engine died mid-shard")
        return self.engine.token_nll(seqs, progress)

    def close(self):
        self.engine.close()


def test_a_scorer_failing_mid_shard_is_retried_and_changes_nothing(prefect_api, tmp_path, monkeypatch):
    import reflectune.engines as engines
    from reflectune.flows.recycle import recycle

    # the cherry method: no teacher, so only scoring can differ
    common = dict(dataset=dataset(tmp_path), limit=4, shard_size=2, selection={"method": "cherry", "budget": 0.5},
                  training={"enabled": False}, execution={"retries": 1, "retry_delay_seconds": 0})
    calm = recycle(RecycleParams(output=str(tmp_path / "calm"), **common))
    state = {"failed": False}
    real = engines.load_student
    monkeypatch.setattr(engines, "load_student", lambda *a, **kw: FailsMidShardOnce(real(*a, **kw), state))
    flow_state = recycle(RecycleParams(output=str(tmp_path / "disturbed"), **common), return_state=True)
    assert state["failed"] and flow_state.is_completed()
    manifest = flow_state.result()
    assert manifest["engine_loads"] == 2  # the engine that failed was dropped and loaded afresh
    students = [t for t in task_runs(flow_state.state_details.flow_run_id, {"student-shard": 2})
                if t.name.startswith("student-shard")]
    assert sorted(t.run_count for t in students) == [1, 2] and all(t.state.is_completed() for t in students)
    for name in ("decisions.parquet", "selected.parquet"):
        assert pl.read_parquet(tmp_path / "disturbed" / name).equals(pl.read_parquet(tmp_path / "calm" / name)), name
    scores = {d: sorted(p.name for p in (tmp_path / d / "scores").glob("*.parquet")) for d in ("calm", "disturbed")}
    assert scores["calm"] == scores["disturbed"] and len(scores["calm"]) == 2
    for name in scores["calm"]:
        assert pl.read_parquet(tmp_path / "disturbed" / "scores" / name).equals(
            pl.read_parquet(tmp_path / "calm" / "scores" / name))
    assert calm["counts"] == manifest["counts"]


def test_teacher_and_student_of_one_model_share_one_vllm_engine(prefect_api, tmp_path):
    from reflectune.flows.recycle import recycle

    params = RecycleParams(dataset=dataset(tmp_path), output=str(tmp_path / "out"), limit=2, shard_size=1,
                           teacher={"engine": "vllm", "max_new_tokens": 8}, student={"engine": "vllm"},
                           training={"enabled": False})
    manifest = recycle(params)
    assert manifest["engine_loads"] == 1
    assert manifest["teacher"] == f"vllm:{manifest['student']}" and manifest["token_usage"]["completion_tokens"] > 0
    scores = pl.concat([pl.read_parquet(p) for p in (tmp_path / "out" / "scores").glob("*.parquet")])
    assert scores.height == 8 and scores["score_error"].null_count() == 8


def test_a_killed_run_resumes_without_redoing_finished_shards(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from reflectune.flows.recycle import recycle
    from reflectune.cli import _parser, recycle_params

    argv = ["recycle", dataset(tmp_path), "--out", str(tmp_path / "out"), "--limit", "4", "--shard-size", "1",
            "--max-new-tokens", "8", "--no-train"]
    # the run reports to the same API as the test, so it does not start a server of its own
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "reflectune.cli", *argv], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    scores = tmp_path / "out" / "scores"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if scores.exists() and any(p.suffix == ".json" for p in scores.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    done_before = {p.name for d in ("variants", "scores") for p in (out / d).glob("*.json")}
    assert 1 <= len(done_before) < 8

    manifest = recycle(recycle_params(_parser().parse_args(argv)))
    reused = [r for r in manifest["shard_results"] if r["reused"]]
    computed = [r for r in manifest["shard_results"] if not r["reused"]]
    assert {os.path.basename(r["uri"]) + ".json" for r in reused} == done_before
    assert len(computed) == 8 - len(done_before)
    assert manifest["counts"]["valid_rows"] == 4
    decisions = pl.read_parquet(out / "decisions.parquet")
    assert decisions.height == 4 and decisions["sample_id"].n_unique() == 4


def test_flow_parameters_render_a_form():
    from reflectune.flows.recycle import recycle

    schema = recycle.parameters.model_dump()
    params = schema["definitions"]["RecycleParams"]["properties"]
    assert {"dataset", "output", "teacher", "student", "selection", "training", "shard_size", "limit"} <= set(params)
    for name, model in (("TeacherConfig", "teacher"), ("StudentConfig", "student"), ("SelectionConfig", "selection"),
                        ("TrainingConfig", "training"), ("ExecutionConfig", "execution")):
        for field, spec in schema["definitions"][name]["properties"].items():
            assert spec.get("description"), f"{model}.{field} has no description"
            assert "default" in spec, f"{model}.{field} has no default"


def test_invalid_parameters_are_reported_together():
    with pytest.raises(ValueError) as err:
        RecycleParams(shard_size=0, selection={"mode": "best", "budget": 2})
    text = str(err.value)
    assert "shard_size" in text and "selection.mode" in text and "selection.budget" in text


def test_bounded_submission_keeps_at_most_the_limit_in_flight_and_the_order():
    """`_bounded` submits shard tasks with at most `limit` unfinished, collecting the oldest
    first; each collected result advances the tracker once."""
    from reflectune.flows.recycle import _bounded

    in_flight, peak, advanced = set(), [0], []

    class Future:
        def __init__(self, item):
            self.item = item
            in_flight.add(item)
            peak[0] = max(peak[0], len(in_flight))

        def result(self):
            in_flight.discard(self.item)
            return {"shard": self.item}

    class Tracker:
        def advance(self, result):
            advanced.append(result["shard"])

    for limit, n in ((1, 5), (3, 7), (4, 2)):
        in_flight.clear()
        advanced.clear()
        peak[0] = 0
        results = _bounded(Future, list(range(n)), limit, Tracker())
        assert [r["shard"] for r in results] == advanced == list(range(n))
        assert peak[0] == min(limit, n) and not in_flight
