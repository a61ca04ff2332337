"""A plain hook for progress: stages and flows report, a front end (the CLI's bar) listens;
and the user's wish to stop, which the work checks.

Kept out of Prefect so the library reports progress the same way wherever it runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from reflectune.errors import Interrupted

_listener: Callable[[str, dict[str, Any]], None] | None = None
# set by a front end when the user asks to stop (the CLI's Ctrl-C): work in progress checks it
# between batches and requests, and ends its shard without a done marker
stop = threading.Event()


def stop_on_terminate() -> None:
    """From now on SIGTERM (`timeout`, `docker stop`, a worker cancelling the run) first asks the
    work to stop, as Ctrl-C does, then goes to the handler installed before (Prefect's, which ends
    the flow run as crashed once its tasks return: they return at once). A no-op outside the
    main thread, where handlers cannot be set."""
    try:
        before = signal.getsignal(signal.SIGTERM)

        def stopping(signum: int, frame: Any) -> None:
            stop.set()
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, stopping)
    except ValueError:
        pass


def check() -> None:
    """Raise Interrupted where the user asked to stop."""
    if stop.is_set():
        raise Interrupted(INTERRUPTED)


T = TypeVar("T")
# how often a wait looks at `stop`: a Ctrl-C ends any wait within this
TICK = 0.1


async def interruptible(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` (a pause, a backoff, a queue for a slot), raising Interrupted as soon as
    the user asks to stop: a wait of minutes must not outlast a Ctrl-C."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=TICK)
            if done:
                return task.result()
            check()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


INTERRUPTED = ("interrupted: finished shards are kept; to resume, run the same command again (only unfinished "
               "shards run)")


def listen(callback: Callable[[str, dict[str, Any]], None] | None) -> None:
    global _listener
    _listener = callback


def report(event: str, **info: Any) -> None:
    if _listener is not None:
        _listener(event, info)


class Meter:
    """Work done of a total and its rate, for a person watching: generations (or tokens)
    finished, new tokens per second since the start."""

    def __init__(self, total: int, unit: str):
        import time

        self.total, self.unit, self.done, self.tokens = max(total, 1), unit, 0, 0
        self._clock = time.monotonic
        self.start = self._clock()

    def add(self, done: int, tokens: int) -> None:
        self.done += done
        self.tokens += tokens

    @property
    def rate(self) -> float:
        return self.tokens / max(self._clock() - self.start, 1e-9)

    @property
    def percent(self) -> float:
        # retries can take the count past its planned total: the stage is not done until it says so
        return min(99.0, 100.0 * self.done / self.total)

    def line(self) -> str:
        return f"{self.done:.0f} of {self.total} {self.unit}, {self.rate:,.0f} tok/s"
