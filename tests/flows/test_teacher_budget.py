"""The teacher budget through the whole run: `reflectune recycle` against the provider
emulator stops with exit 2 before the budget is passed, the flow run ends Failed with no
retry, and a rerun with a larger budget completes without paying for anything twice."""

import json
import os
import subprocess
import sys

from reflectune import journal, plan
from reflectune import manifest as run
from reflectune.config import RecycleParams
from reflectune.emulator import Emulator

from ..conftest import ROOT, SAMPLE


def test_a_budget_stops_the_run_and_a_larger_one_finishes_it_without_paying_twice(prefect_api, tokenizer, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    from reflectune.flows.recycle import recycle

    estimate = plan.plan(str(SAMPLE), tokenizer, limit=6, max_new_tokens=256)["teacher_cost"]["tokens"]
    budget = estimate // 2
    out = tmp_path / "out"
    with Emulator(latency=0.01, answer_words=(8, 24)) as emulator:
        settings = ["--limit", "6", "--shard-size", "2", "--teacher", "emulated", "--teacher-engine", "openai",
                    "--base-url", emulator.url, "--max-new-tokens", "256", "--no-train", "teacher.concurrency=4",
                    "student.max_length=256", "execution.retry_delay_seconds=0"]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENAI_API_KEY": "sk-never-shown"}
        done = subprocess.run([sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out),
                               *settings, f"teacher.budget_tokens={budget}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        stopped = emulator.snapshot()
        held = journal.spend(str(out / "journal"))
        assert done.returncode == 2, done.stderr[-3000:]
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith("reflectune: error: the teacher budget would be passed"), message
        assert f"spent {held.tokens:,} tokens" in message and f"against teacher.budget_tokens {budget:,}" in message
        assert "shards, " in message and " left. To go on, rerun the same command with a larger" in message
        assert "Traceback" not in done.stderr and "AwaitingRetry" not in done.stderr
        # nothing sent could pass the budget; what came back is kept, as the provider counted it
        assert 0 < held.tokens <= budget
        assert (held.requests, held.tokens) == (stopped["answered"], stopped["prompt_tokens"] + stopped["completion_tokens"])
        markers = sorted((out / "variants").glob("*.parquet.json"))
        assert len(markers) < 3 and all(m.with_suffix("").exists() for m in markers)
        with get_client(sync_client=True) as client:
            [last] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert last.state.is_failed()

        params = RecycleParams.model_validate({
            "dataset": str(SAMPLE), "output": str(out), "limit": 6, "shard_size": 2,
            "teacher": {"model": "emulated", "engine": "openai", "base_url": emulator.url, "max_new_tokens": 256,
                        "concurrency": 4, "budget_tokens": 4 * estimate, "price_input_per_m": 2.5,
                        "price_output_per_m": 10.0},
            "student": {"max_length": 256}, "training": {"enabled": False}})
        manifest = recycle(params)
        final = emulator.snapshot()
    spend = manifest["teacher_spend"]
    assert final["duplicates"] == 0, final
    # the unfinished shards replay what the stopped run kept for them; finished ones are reused whole
    reused = sum(json.loads(m.read_text())["detail"]["requests_sent"] for m in markers)
    assert spend["requests_replayed"] == held.requests - reused
    assert spend["requests_sent"] == final["answered"] - stopped["answered"]
    assert (spend["journal"]["requests"], spend["journal"]["prompt_tokens"], spend["journal"]["completion_tokens"]) == (
        final["answered"], final["prompt_tokens"], final["completion_tokens"])
    assert spend["journal"]["usd"] == round((final["prompt_tokens"] * 2.5 + final["completion_tokens"] * 10) / 1e6, 6)
    assert manifest["counts"]["valid_rows"] == 6
    # the summary and the report say what was sent, replayed and held, and what it cost
    line = next(x for x in run.lines(manifest) if x.startswith("teacher requests:"))
    assert f"{spend['requests_sent']:,} sent" in line and f"{spend['requests_replayed']:,} replayed" in line
    assert f"the journal holds {final['answered']:,} requests" in line and f"${journal.dollars(spend['journal']['usd'])}" in line
    html = (out / "report.html").read_text()
    assert "replayed from the journal (not paid again)" in html and "held by the journal" in html
    assert "sk-never-shown" not in json.dumps(manifest) + done.stderr
