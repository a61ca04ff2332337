"""The Prefect API of one command run, where no PREFECT_API_URL names a server.

Prefect's own temporary server is started in the command's process group with the database
under PREFECT_HOME: a terminal's Ctrl-C stops it before the flow can record anything, a killed
command leaves it running, and runs at once share (and lock) one SQLite file. This one has a
database of its own in a fresh folder, runs in a session of its own (Ctrl-C reaches only the
command, which stops the server last), dies with the command even when the command is killed
(Linux's parent-death signal), waits up to STARTUP_SECONDS for a slow machine and is started
again once before the command gives up with a message that says what to set.

Prefect is not imported here: the server is started as a process, `python -m
reflectune.api_server uvicorn|prefect ARGS...`, which runs the program named after bounding
SQLite's lock waits in that process (`bound_sqlite_waits`). The test suite's servers run the
same way.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from reflectune.errors import ReflectuneError

STARTUP_SECONDS = 180.0
PR_SET_PDEATHSIG = 1
# how long a connection of the server waits for SQLite's write lock (Prefect sets 60 s)
BUSY_TIMEOUT_MS = 5000


class ServerStartError(ReflectuneError):
    """The temporary Prefect server did not start."""


def start(startup_seconds: float = STARTUP_SECONDS) -> str:
    """Start a Prefect API for this process and return its URL. It is stopped when the process
    exits, after Prefect has sent the logs and events it holds (they go to this server)."""
    home = Path(tempfile.mkdtemp(prefix="reflectune-prefect-"))
    for attempt in (1, 2):
        port = _free_port()
        proc = _start(home, port)
        url = f"http://127.0.0.1:{port}/api"
        if _wait(proc, f"{url}/health", startup_seconds):
            # atexit runs after Prefect's own exit hooks, which drain its log and event queues
            atexit.register(_end, proc, home)
            return url
        stop(proc)
    log = (home / "server.log").read_text(errors="replace").strip()
    shutil.rmtree(home, ignore_errors=True)
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {startup_seconds:.0f} s, twice (its log ends: "
        f"{log[-600:] or 'empty'}). Start one with `prefect server start` and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api, or run again on a less busy machine")


def _end(proc: subprocess.Popen, home: Path) -> None:
    stop(proc)
    shutil.rmtree(home, ignore_errors=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a server process; kill it if it has not ended after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(home: Path, port: int) -> subprocess.Popen:
    prefect_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    parent = os.getpid()
    with open(home / "server.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "reflectune.api_server", "uvicorn", "--app-dir", str(prefect_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _detach(parent))


def _detach(parent: int) -> None:
    """In the server's process before it starts: a session of its own, and death with the
    command."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the command stops the server itself
        return
    if os.getppid() != parent:  # the command died before the signal was set
        os._exit(1)


def _wait(proc: subprocess.Popen, health: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(health, timeout=5) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound_sqlite_waits(busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """In a Prefect server's process, before its database engine exists: each SQLite connection
    waits at most `busy_timeout_ms` for the write lock, instead of Prefect's 60 s.

    Prefect's server runs its event loop in the main thread and each SQLite connection in a
    thread of its own. When the main thread's garbage collector frees a cursor of a connection
    whose thread is waiting for the write lock, it blocks on that connection's mutex until the
    wait ends; the lock's holder is a coroutine on the blocked loop, so the wait always runs to
    its timeout, and the whole server answers nothing meanwhile. With 60 s, a worker's poll, a
    heartbeat or a form submission waits a minute now and then; with 5 s the server is back
    within seconds, and the write that gave up is answered 503 and retried by its client."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    prefect_setup = AioSqliteConfiguration.setup_sqlite

    def setup_sqlite(self, conn, record) -> None:
        prefect_setup(self, conn, record)
        cursor = conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)};")
        cursor.close()

    AioSqliteConfiguration.setup_sqlite = setup_sqlite


def main(argv: list[str]) -> None:
    """`python -m reflectune.api_server uvicorn|prefect ARGS...`: run that program (uvicorn with
    Prefect's app, or `prefect server start`) as this process, its SQLite waits bounded."""
    import runpy

    if not argv or argv[0] not in ("uvicorn", "prefect"):
        print("usage: python -m reflectune.api_server uvicorn|prefect ARGS... (for a server: "
              "python -m reflectune.api_server prefect server start)", file=sys.stderr)
        raise SystemExit(2)
    bound_sqlite_waits()
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
