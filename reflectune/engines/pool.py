"""One engine per worker process, reused across shards.

Engines live in this plain module (not in a task's module: Prefect pickles task functions by
value, so a global there would be a fresh copy per task). Asking for an engine with another
model closes the ones held first, so a worker never holds two different models at once (a
teacher and a student of the same model may both stay). A vLLM engine is keyed without its
role: the teacher and the student of one model get the same engine when their options agree,
which reflectune.engine_options makes sure of. An engine whose work raised is closed and dropped, so a retry starts from a fresh one; `close_all` shuts
engines down explicitly (vLLM's engine processes do not end cleanly at exit otherwise).
"""

from __future__ import annotations

import atexit
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from reflectune import progress

_held: dict[str, Any] = {}
load_seconds: list[float] = []  # one entry per engine loaded in this process, for accounting
_lock = threading.Lock()
# engines are not thread-safe: one shard at a time per worker process uses the model
_in_use = threading.RLock()


def _key(role: str, engine: str, spec: str, options: dict[str, Any]) -> str:
    # the API key is not part of the identity and never lands in a key that may be logged
    shown = {k: v for k, v in sorted(options.items()) if k != "api_key"}
    return json.dumps([engine, spec, shown, None if engine == "vllm" else role], default=str)


def get(role: str, engine: str, spec: str, **options: Any) -> Any:
    """The held engine for (role, engine, spec, options), loading it once. `role` is
    "student" or "teacher"."""
    from reflectune.engines import load_student, load_teacher

    key = _key(role, engine, spec, options)
    with _lock:
        if key in _held:
            return _held[key]
        for old in list(_held):
            if json.loads(old)[1] != spec:
                _close(_held.pop(old))
        loader = load_student if role == "student" else load_teacher
        progress.check()
        start = time.perf_counter()
        _held[key] = loader(engine, spec, **options)
        load_seconds.append(time.perf_counter() - start)
        return _held[key]


@contextmanager
def using(role: str, engine: str, spec: str, **options: Any) -> Iterator[Any]:
    """The held engine, for the exclusive use of the calling thread. If the work raises, the
    engine may be broken (a dead engine process, memory exhausted): it is closed and dropped."""
    with _in_use:
        held = get(role, engine, spec, **options)
        # an engine that is an API client (a batch API's) serves every thread at once
        shared = getattr(held, "thread_safe", False)
        with _released(_in_use) if shared else nullcontext():
            try:
                yield held
            except BaseException:
                discard(held)
                raise


@contextmanager
def _released(lock: Any) -> Iterator[None]:
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


def discard(engine: Any) -> None:
    with _lock:
        for key in [k for k, v in _held.items() if v is engine]:
            del _held[key]
    _close(engine)


def close_all() -> None:
    with _lock:
        seen = set()
        for key in list(_held):
            engine = _held.pop(key)
            if id(engine) not in seen:
                seen.add(id(engine))
                _close(engine)


def _close(engine: Any) -> None:
    close = getattr(engine, "close", None)
    if close:
        close()


atexit.register(close_all)
