"""The request journal's files through the whole run: `reflectune recycle` with a journal file
cut short stops at once with exit 2, one message naming the file and the fix, no task retried
and nothing sent."""

import os
import subprocess
import sys

from reflectune import journal
from reflectune.emulator import Emulator
from reflectune.reflection import Generation

from ..conftest import ROOT, SAMPLE


def test_a_damaged_journal_file_stops_the_run_at_once_naming_it(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    # a part file of the journal for the run's rows, as a writer keeps it, then cut short
    kept = journal.Journal(str(out / "journal"), 0, 5)
    kept.add("a-key", Generation(text="an answer", prompt_tokens=120, completion_tokens=80, finish_reason="stop"))
    kept.close(merge=False)
    [held] = journal.files(str(out / "journal"))
    data = open(held.uri, "rb").read()
    with open(held.uri, "wb") as f:
        f.write(data[: len(data) // 2])

    with Emulator(latency=0.01) as emulator:
        # the default retries (3, from 10 s): each retry would show as a run count above 1
        done = subprocess.run(
            [sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out), "--limit", "6",
             "--shard-size", "2", "--teacher", "emulated", "--teacher-engine", "openai", "--base-url", emulator.url,
             "--max-new-tokens", "256", "--no-train", "student.max_length=256"],
            cwd=ROOT, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENAI_API_KEY": "sk-test"},
            capture_output=True, text=True, timeout=600)
        assert emulator.snapshot()["answered"] == 0
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("reflectune: error: the request journal's file "), message
    assert held.uri in message and "Delete it and rerun the same command" in message
    assert "what it held is then sent and paid for again (1 request, 200 tokens)" in message
    assert "Traceback" not in done.stderr and "once the cause is fixed" not in done.stderr
    with get_client(sync_client=True) as client:
        [last] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[last.id])))
    shards = [t for t in tasks if t.name.startswith("teacher-shard")]
    assert last.state.is_failed() and shards and all(t.run_count == 1 for t in shards), [
        (t.name, t.run_count, t.state_name) for t in shards]
