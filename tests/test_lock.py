"""One run at a time per output folder: a second run is told who holds it; a dead holder's
claim is taken over."""

import json
import socket
import subprocess
import sys

import pytest

from reflectune import lock, run_folder

from .conftest import ROOT


def test_a_second_run_is_told_who_holds_the_folder_and_a_dead_holder_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    with lock.hold(out):
        claim = json.loads((tmp_path / "out" / run_folder.LOCK).read_text())
        assert claim["host"] == socket.gethostname()
        other = subprocess.run([sys.executable, "-c", f"from reflectune import lock\nwith lock.hold({out!r}): pass"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert other.returncode != 0
        assert f"output {out} is in use by another run (host {claim['host']}, process {claim['pid']}" in other.stderr
    assert not (tmp_path / "out" / run_folder.LOCK).exists()  # let go at the end

    # a claim whose process is gone, and one from another host whose heartbeat stopped long ago
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for stale in ({"host": socket.gethostname(), "pid": int(dead.stdout), "beat": 0},
                  {"host": "elsewhere", "pid": 1, "beat": 0}):
        (tmp_path / "out" / run_folder.LOCK).write_text(json.dumps(stale | {"token": "old", "since": "then"}))
        with lock.hold(out):
            assert json.loads((tmp_path / "out" / run_folder.LOCK).read_text())["token"] != "old"
    # a live holder on another host
    import time

    (tmp_path / "out" / run_folder.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 7, "beat": time.time(),
                                                          "token": "t", "since": "now"}))
    with pytest.raises(lock.OutputInUse, match=r"host elsewhere, process 7"):
        with lock.hold(out):
            pass
