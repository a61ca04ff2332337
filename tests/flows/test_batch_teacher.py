"""`reflectune recycle` through a batch API, killed while its batches wait at the provider: the
rerun re-attaches to them (the emulator counts no new batch for work already submitted), the
run completes, and the manifest gives tokens and cost at the batch price."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from reflectune import journal
from reflectune.emulator import Emulator

from ..conftest import ROOT, SAMPLE


def test_a_run_killed_while_batches_wait_is_finished_by_the_rerun_without_new_batches(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    with Emulator(latency=0.0, answer_words=(6, 16), batch_seconds=5.0) as emulator:
        command = [sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out), "--limit", "8",
                   "--shard-size", "4", "--teacher", "emulated", "--teacher-engine", "openai-batch",
                   "--base-url", emulator.url, "--max-new-tokens", "256", "--no-train", "student.max_length=256",
                   "teacher.batch_poll_seconds=0.5", "teacher.batch_poll_max_seconds=1",
                   "teacher.price_input_per_m=2.0", "teacher.price_output_per_m=8.0",
                   "execution.retry_delay_seconds=0"]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENAI_API_KEY": "sk-batch-never-shown"}
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        # both shards' first batches (ins and res) are at the provider: kill the whole run
        while sum(emulator.snapshot()["batches"].values()) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no batch was created"
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = emulator.snapshot()
        assert killed["answered"] == 0 and not (out / "manifest.json").exists()

        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        stats = emulator.snapshot()
    assert done.returncode == 0, done.stderr[-3000:]
    # the killed run's two batches were waited for, not submitted again; then one ins_res batch per shard
    assert killed["batches"] == {"openai": 2} and stats["batches"] == {"openai": 4}, stats
    assert stats["batch_lines"] == stats["batch_lines_distinct"] == 3 * 8 and stats["duplicates"] == 0, stats
    manifest = json.loads((out / "manifest.json").read_text())
    spend = manifest["teacher_spend"]
    assert spend["priced_as"] == "batch" and (spend["price_input_per_m"], spend["price_output_per_m"]) == (1.0, 4.0)
    assert (spend["batches_created"], spend["batches_reattached"], spend["batch_lines"]) == (2, 2, 8)
    assert spend["requests_sent"] == stats["answered"] == 24
    held = journal.spend(str(out / "journal"))
    assert (held.prompt_tokens, held.completion_tokens) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert spend["journal"]["usd"] == round((stats["prompt_tokens"] * 1.0 + stats["completion_tokens"] * 4.0) / 1e6, 6)
    assert "at the batch price" in done.stdout + done.stderr
    assert manifest["counts"]["valid_rows"] == 8
    # each shard's progress artifact ends with its last batch: lines done and failed
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        shown = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"reflectune-teacher-part-0000{i}" for i in range(2)])))
    # (other tests' runs write these keys too, without batches)
    last = [a.description for a in shown if a.data == 100.0 and "batch" in a.description]
    assert len(last) == 2 and all(re.search(r"batch \S+: completed, 4 of 4 done, 0 failed", d) for d in last), last
    assert "sk-batch-never-shown" not in json.dumps(manifest) + done.stdout + done.stderr
