"""One run at a time per output folder.

Two runs into one folder would both do all the work (each sees the other's shards unfinished)
and interleave their outputs. A run holds its folder with a small file naming its host,
process and start, refreshed every HEARTBEAT seconds; a second run reads it and stops with a
message naming the holder and the file. A holder that died is taken over: on any host when its
heartbeat is older than STALE seconds (a live run beats every HEARTBEAT seconds, so a claim
that stopped beating names a run that is gone, even where its process id now belongs to an
unrelated process), and on the same host at once when its process is gone. The same file
works on local disks and object stores (no atomic create there: a run reads its claim back
after a moment, and the later writer of two claims at one instant wins).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from reflectune import io, run_folder
from reflectune.errors import ReflectuneError

HEARTBEAT = 30.0
STALE = 120.0


class OutputInUse(ReflectuneError):
    """Another run holds the output folder."""


def check(folder: str) -> None:
    """Raise OutputInUse when a live run holds `folder`: a command checks before it starts
    anything slow (a Prefect server), so a busy folder is named at once. `hold` checks again."""
    uri = run_folder.RunFolder(folder).lock
    held = _read(uri)
    if held and _alive(held):
        raise _in_use(folder, uri, held)


@contextmanager
def hold(folder: str) -> Iterator[None]:
    uri = run_folder.RunFolder(folder).lock
    claim = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
             "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "beat": time.time()}
    held = _read(uri)
    if held and held.get("token") != claim["token"] and _alive(held):
        raise _in_use(folder, uri, held)
    io.write_json(claim, uri)
    time.sleep(0.05)  # a claim written at the same moment by another run: the later one stands
    held = _read(uri)
    if held and held.get("token") != claim["token"]:
        raise _in_use(folder, uri, held)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            try:
                if (_read(uri) or {}).get("token") == claim["token"]:
                    io.write_json(claim | {"beat": time.time()}, uri)
            except Exception:  # storage hiccup: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="output-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        try:
            if (_read(uri) or {}).get("token") == claim["token"]:
                io.remove(uri)
        except Exception:  # left behind, it is taken over as a dead holder's
            pass


def _read(uri: str) -> dict[str, Any] | None:
    try:
        held = io.read_json(uri)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):  # cut short: nobody's claim
        return None
    return held if isinstance(held, dict) else None


def _alive(held: dict[str, Any]) -> bool:
    beat = held.get("beat")
    if not isinstance(beat, (int, float)) or time.time() - beat >= STALE:
        return False  # no heartbeat: the run is gone, whatever holds its process id now
    if held.get("host") != socket.gethostname():
        return True
    pid = held.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():  # the latter: an earlier run of this very process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _in_use(folder: str, uri: str, held: dict[str, Any]) -> OutputInUse:
    beat = held.get("beat")
    age = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return OutputInUse(
        f"output {folder} is in use by another run (host {held.get('host')}, process {held.get('pid')}, since "
        f"{held.get('since')}{age}; its claim is {uri}): wait for it to end, or write "
        f"to another folder. A claim whose heartbeat stopped {STALE:.0f} s ago is taken over by the next run; to "
        f"take it over sooner, when you know no run writes there, delete {uri}")
