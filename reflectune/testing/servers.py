"""Local servers and helpers shared by the test suite and the benchmarks: a free loopback
port, waiting for an HTTP endpoint, `prefect server start` with its own database, and a
cluster of Prefect process workers on it (`Cluster`, `api`, `write_rows`).

Prefect and psutil are imported inside the functions that use them, so the library still
imports without Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from reflectune import api_server

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def prefect_server(home: Path) -> Iterator[dict]:
    """`prefect server start` on a free loopback port with its database and log under `home`, its
    SQLite waits bounded as the command line's server has them (`api_server.bound_sqlite_waits`):
    what workers and the UI talk to. Yields the API `url`, the `ui` address, `home` and `log`.
    The scheduler looks for due runs every 5 seconds so scheduled runs start promptly."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reflectune.api_server", "prefect", "server", "start",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_http(f"{url}/health", 120)
            yield {"url": url, "ui": f"http://127.0.0.1:{port}", "home": home, "log": home / "server.log"}
        finally:
            api_server.stop(proc, grace=20)


class Cluster:
    """Process workers on a Prefect server, running the flows of the checkout at `code_dir`.
    `incoming/` under `root` is the folder the re-recycle deployment watches."""

    def __init__(self, server: dict, root: Path, code_dir: Path):
        self.server, self.root, self.code_dir = server, root, code_dir
        self.watch, self.rerecycle_out = root / "incoming", root / "rerecycle"
        self.watch.mkdir()
        self.env = {**os.environ, "PREFECT_API_URL": server["url"], "REFLECTUNE_CODE_DIR": str(code_dir),
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "REFLECTUNE_WATCH": str(self.watch), "REFLECTUNE_RERECYCLE_OUT": str(self.rerecycle_out),
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.workers: dict[str, subprocess.Popen] = {}

    def command(self, *args: str) -> str:
        done = subprocess.run(list(args), cwd=self.code_dir, env=self.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout + done.stderr

    def deploy(self, heartbeat: int | None = None, grace: int | None = None) -> str:
        """`reflectune cluster setup` (its heartbeat and grace when given), every deployment of
        deployments/prefect.yaml, an orchestrator worker on the reflectune pool and two
        workers on the GPU pool, each with one CPU thread for torch (on a machine without GPUs the
        two share its cores, as two workers share none of a GPU node's GPUs: two processes each
        spinning a thread per core would slow both several times over). Returns what the setup
        printed."""
        setup = [*(["--heartbeat", str(heartbeat)] if heartbeat else []), *(["--grace", str(grace)] if grace else [])]
        out = self.command(str(BIN / "reflectune"), "cluster", "setup", *setup)
        self.command(str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
                     "--prefect-file", "deployments/prefect.yaml")
        self.start_worker("orchestrator", "reflectune", 4)
        for name in ("gpu-a", "gpu-b"):
            self.start_worker(name, "gpu", 1, OMP_NUM_THREADS="1")
        return out

    def start_worker(self, name: str, pool: str, limit: int, **env: str) -> None:
        log = open(self.root / f"worker-{name}.log", "a")
        self.workers[name] = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name,
             "--limit", str(limit)], cwd=self.code_dir, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and every process it started, as when its machine dies."""
        import psutil

        proc = psutil.Process(self.workers[name].pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.workers[name].wait(10)

    def worker_running(self, flow_run_id: str) -> str | None:
        """The worker whose processes run this flow run (found by the run id in their environment)."""
        import psutil

        for name, popen in self.workers.items():
            if popen.poll() is not None:
                continue
            for child in psutil.Process(popen.pid).children(recursive=True):
                try:
                    if child.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                        return name
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return None

    def stop(self) -> None:
        for name, popen in self.workers.items():
            if popen.poll() is None:
                self.kill_worker(name)


@contextmanager
def api(cluster: Cluster):
    """A synchronous Prefect client for the cluster's server, with PREFECT_API_URL set to it
    meanwhile (so `run_deployment` inside talks to it too)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster.server["url"]}):
        with get_client(sync_client=True) as client:
            yield client


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
