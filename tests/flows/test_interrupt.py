"""Ctrl-C in the waits of a paid teacher: `reflectune recycle` against the provider emulator,
SIGINT to its process group as a terminal sends it while every request waits on a rate-limit
pause (and the refused one on its retry's backoff), or while batches wait at the provider. The
command exits 130 in seconds with one line, sends nothing after the Ctrl-C (the emulator's own
count), keeps what was answered in the journal, and marks no shard done."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from reflectune import journal
from reflectune.emulator import Emulator

from ..conftest import ROOT, SAMPLE

# a 2-core CI machine: the command's exit after the Ctrl-C, Prefect's teardown included
STOPS_WITHIN = 15.0


def _sent(stats: dict) -> int:
    """Requests the emulator received online, whatever it answered."""
    return sum(stats["statuses"].values())


def _interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[int, float, list[psutil.Process]]:
    """SIGINT to the command's process group (a terminal's Ctrl-C), or SIGTERM to the command
    alone (`timeout`, `docker stop`); its exit code and the seconds it took."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    start = time.monotonic()
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    return code, time.monotonic() - start, kids


def _wait_for(proc: subprocess.Popen, log, ready, what: str) -> None:
    """Wait for `ready()` while the command runs; the command is killed if it never comes."""
    deadline = time.monotonic() + 180
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"{what}: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.1)


def _check_stopped(code, seconds, kids, err: str, out, expected: int = 130) -> None:
    assert code == expected and seconds < STOPS_WITHIN, (code, seconds, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("reflectune: interrupted: finished shards are kept"), err[-3000:]
    time.sleep(0.5)
    assert not [p for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "processes left behind"
    # no teacher shard was finished: none is marked done
    assert not list((out / "variants").glob("*.parquet.json"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_a_rate_limit_pause_stops_at_once_and_sends_nothing_more(prefect_api, tmp_path, sig):
    """SIGTERM stops the run as Ctrl-C does (exit 143): Prefect's own handler alone waited for
    the shard at work to finish, then marked it done."""
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    # two requests a minute, stated nowhere (a gateway's limit): the burst after the first answer
    # meets 429s with Retry-After about 30 s, and every request waits
    with Emulator(rpm=2, window=60.0, headers="none", latency=0.01, answer_words=(8, 24)) as emulator:
        command = [sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out), "--limit", "6",
                   "--shard-size", "2", "--teacher", "emulated", "--teacher-engine", "openai",
                   "--base-url", emulator.url, "--max-new-tokens", "256", "--no-train", "teacher.concurrency=4",
                   "student.max_length=256", "execution.retry_delay_seconds=0"]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENAI_API_KEY": "sk-never-shown"}
        log = open(tmp_path / "log", "w")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=log)
        _wait_for(proc, log, lambda: emulator.snapshot()["statuses"].get("429"), "no request was rate limited")
        time.sleep(1.0)  # in the pause now: the pacer's, and the refused request's backoff
        before = emulator.snapshot()
        code, seconds, kids = _interrupt(proc, sig)
        log.close()
        err = (tmp_path / "log").read_text()
        after = emulator.snapshot()
    _check_stopped(code, seconds, kids, err, out, 130 if sig == signal.SIGINT else 143)
    assert _sent(after) == _sent(before) and after["answered"] == before["answered"], (before, after)
    # what was answered is kept, as the provider counted it: a rerun pays for none of it again
    held = journal.spend(str(out / "journal"))
    assert (held.requests, held.tokens) == (after["answered"], after["prompt_tokens"] + after["completion_tokens"])
    assert held.requests >= 1


def test_ctrl_c_while_batches_wait_at_the_provider_stops_at_once(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    with Emulator(latency=0.0, answer_words=(6, 16), batch_seconds=600.0) as emulator:
        command = [sys.executable, "-m", "reflectune.cli", "recycle", str(SAMPLE), "--out", str(out), "--limit", "4",
                   "--shard-size", "2", "--teacher", "emulated", "--teacher-engine", "openai-batch",
                   "--base-url", emulator.url, "--max-new-tokens", "256", "--no-train", "student.max_length=256",
                   "teacher.batch_poll_seconds=30", "execution.retry_delay_seconds=0"]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENAI_API_KEY": "sk-never-shown"}
        log = open(tmp_path / "log", "w")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=log)
        _wait_for(proc, log, lambda: sum(emulator.snapshot()["batches"].values()) >= 2, "no batch was created")
        time.sleep(1.0)  # polling: a wait of 30 s between looks
        before = emulator.snapshot()
        code, seconds, kids = _interrupt(proc)
        log.close()
        err = (tmp_path / "log").read_text()
        after = emulator.snapshot()
    _check_stopped(code, seconds, kids, err, out)
    assert after["batches"] == before["batches"] and after["batch_lines"] == before["batch_lines"], (before, after)
