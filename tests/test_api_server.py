"""The command's own Prefect server: it answers, lives in a session of its own, dies with the
command even when the command is killed, a server that cannot start is named with the setting
to use instead, and a held database lock costs it seconds, not a minute."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from reflectune import api_server
from reflectune.errors import ReflectuneError

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_server_dies_with_a_killed_command_and_a_failed_start_says_what_to_set(tmp_path):
    script = "from reflectune import api_server\nimport time\nprint(api_server.start(), flush=True)\ntime.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    [server] = psutil.Process(proc.pid).children()
    assert os.getsid(server.pid) != os.getsid(proc.pid)  # a terminal's Ctrl-C does not reach it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE

    with pytest.raises(ReflectuneError, match=r"did not answer within 0 s, twice .* set PREFECT_API_URL"):
        api_server.start(startup_seconds=0.01)


def test_a_held_database_lock_is_given_up_in_seconds_and_answered_503(tmp_path):
    """Another writer holds the server's SQLite write lock: a write the server is asked for gives
    up after api_server.BUSY_TIMEOUT_MS and is answered 503 (clients retry that), where
    Prefect's own 60 s would outlast the client's 30 s timeout; once the lock is free the same
    write succeeds. (bound_sqlite_waits says why a long wait stalls the whole server.)"""
    port = api_server._free_port()
    proc = api_server._start(tmp_path, port)
    url = f"http://127.0.0.1:{port}/api"
    try:
        assert api_server._wait(proc, f"{url}/health", 120)
        db = sqlite3.connect(tmp_path / "prefect.db", isolation_level=None, timeout=30)
        db.execute("BEGIN IMMEDIATE")
        try:
            held = httpx.post(f"{url}/flows/", json={"name": "held"}, timeout=30)
        finally:
            db.execute("ROLLBACK")
            db.close()
        free = httpx.post(f"{url}/flows/", json={"name": "held"}, timeout=30)
    finally:
        api_server.stop(proc)
    assert held.status_code == 503, held.text
    assert free.status_code == 201 and free.json()["name"] == "held"


def test_the_server_launcher_names_what_it_runs_when_given_nothing_it_knows():
    result = subprocess.run([sys.executable, "-m", "reflectune.api_server", "gunicorn"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "python -m reflectune.api_server prefect server start" in result.stderr
