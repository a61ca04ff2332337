"""The command line's progress bars on stderr: shard tasks finished and the work inside the
shard running now, and a bar for the one-stage commands, each with tokens per second."""

from __future__ import annotations

import sys
from collections.abc import Callable

class _RunBars:
    """Two bars on stderr: shard tasks finished, and the work inside the shard running now
    (generations or tokens, with tokens/s), so a slow run can be told from a stuck one."""

    def __enter__(self) -> "_RunBars":
        self.shards = self.work = None
        self.current = None
        return self

    def event(self, name: str, info: dict) -> None:
        from tqdm import tqdm

        if name == "shard":
            if self.shards is None:
                self.shards = tqdm(total=info["total"], desc="shards", unit="task", file=sys.stderr, position=0)
            self.shards.update(1)
        elif name == "work":
            which = (info["stage"], info["shard"])
            if which != self.current:
                if self.work is not None:
                    self.work.close()
                self.current = which
                self.work = tqdm(total=info["total"], desc=f"{info['stage']} {info['shard']}", file=sys.stderr,
                                 position=1, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/"
                                 "{total_fmt} " + info["unit"] + " [{elapsed}] {postfix}")
            self.work.total = max(info["total"], info["done"])
            self.work.n = info["done"]
            note = f"; {info['note']}" if info.get("note") else ""
            self.work.set_postfix_str(f"{info['rate']:,.0f} tok/s{note}", refresh=False)
            self.work.refresh()

    def __exit__(self, *exc: object) -> None:
        for bar in (self.work, self.shards):
            if bar is not None:
                bar.close()
        if self.work is not None or self.shards is not None:
            sys.stderr.write("\n")  # what follows starts on a line of its own


class _progress:
    """A tqdm bar on stderr driven by `advance(n, total, tokens=0)` callbacks: n units done of
    a total that may grow (retries), and new tokens for a tokens/s figure."""

    def __init__(self, label: str, unit: str = "tok"):
        self.label = label
        self.unit = unit
        self.bar = None
        self.tokens = 0
        self.note = ""

    def __enter__(self) -> Callable[..., None]:
        def advance(n: float, total: int, tokens: int = 0, note: str | None = None) -> None:
            """`note`: what the work is waiting on (a batch API's batches), shown until replaced."""
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit=self.unit, unit_scale=True, file=sys.stderr)
            if total != self.bar.total:
                self.bar.total = total
            if note is not None:
                self.note = note
            self.tokens += tokens
            elapsed = self.bar.format_dict["elapsed"] or 1e-9
            self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s" + (f"; {self.note}" if self.note else ""),
                                     refresh=False)
            self.bar.update(n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
