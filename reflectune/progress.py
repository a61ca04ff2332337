"""A plain hook for progress: stages and flows report, a front end (the CLI's bar) listens.

Kept out of Prefect so the library reports progress the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_listener: Callable[[str, dict[str, Any]], None] | None = None


def listen(callback: Callable[[str, dict[str, Any]], None] | None) -> None:
    global _listener
    _listener = callback


def report(event: str, **info: Any) -> None:
    if _listener is not None:
        _listener(event, info)
