"""The command's own Prefect server: it answers, lives in a session of its own, dies with the
command even when the command is killed, and a server that cannot start is named with the
setting to use instead."""

import os
import signal
import subprocess
import sys
import time

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
