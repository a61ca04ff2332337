"""One run at a time per output folder: a second run is told who holds it; a dead holder's
claim is taken over."""

import json
import re
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


def test_a_live_unrelated_process_with_a_stopped_heartbeat_does_not_hold_the_folder(tmp_path):
    """A claim naming a live process of this host (pid 1 here) whose heartbeat stopped a day ago
    is a run that is gone (a live run beats every HEARTBEAT seconds): it is taken over. One that
    still beats is refused, by `check` too, with the claim's file named as the way out."""
    import time

    out = str(tmp_path / "out")
    claim = tmp_path / "out" / run_folder.LOCK
    claim.parent.mkdir()
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "beat": time.time() - 86400,
                                 "token": "old", "since": "yesterday"}))
    lock.check(out)
    with lock.hold(out):
        assert json.loads(claim.read_text())["token"] != "old"

    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "beat": time.time(), "token": "t",
                                 "since": "now"}))
    for attempt in (lambda: lock.check(out), lock.hold(out).__enter__):
        with pytest.raises(lock.OutputInUse) as err:
            attempt()
        assert re.search(rf"process 1, since now, last heartbeat \d+ s ago; its claim is {re.escape(str(claim))}\)",
                         str(err.value))
        assert f"delete {claim}" in str(err.value)
