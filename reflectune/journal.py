"""The request journal: every teacher generation that returns, kept on the run's storage within
seconds and keyed by what determines it, so that no request is paid for twice; and the
budget, which counts what the journal holds.

A key is a hash of the teacher's identity, the messages, the sampling and the output format
asked for (with how it may be enforced). A teacher stage reads the journal first and sends
only the requests it lacks: after a retry, a rerun, a killed worker, or with another shard
size. Generations are buffered and written every `flush_seconds` (1 s) as small Parquet part
files (object stores have no append), so a crash loses at most the last second's answers and
those in flight; when the shard finishes, its writer's parts are merged into one file. File names carry the source rows they cover and their totals, so a stage reads
only the files of its rows, and the spend of the whole journal is known from a listing.

    part-<lo>-<hi>-<writer>-<seq>-<requests>-<prompt tokens>-<completion tokens>.parquet
    merged-<lo>-<hi>-<writer>-0-<requests>-<prompt tokens>-<completion tokens>.parquet

A merged file supersedes the parts of its writer; parts of a writer that died stay, and are
read like any other. A file that cannot be read (cut short, damaged) stops the stage at once
with JournalFileError, naming it: no retry mends it, and only the user may choose to pay its
requests again by deleting it.
"""

from __future__ import annotations

import io as _io
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import polars as pl

from reflectune import io, records
from reflectune.errors import BudgetExceededError, JournalFileError
from reflectune.records import JOURNAL
from reflectune.reflection import NOT_SENT, Generation, request_key

_NAME = re.compile(r"^(part|merged)-(\d+)-(\d+)-([0-9a-f]+)-(\d+)-(\d+)-(\d+)-(\d+)\.parquet$")


@dataclass
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Spend") -> "Spend":
        return Spend(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usd(self, price_input_per_m: float, price_output_per_m: float) -> float:
        return (self.prompt_tokens * price_input_per_m + self.completion_tokens * price_output_per_m) / 1e6


def dollars(amount: float) -> str:
    """An amount of dollars, without the sign, with the digits it needs: cents from a dollar up,
    two significant digits below (a budget of 0.005 is not "0.00", nor is a spend of 0.0012)."""
    if amount == 0 or abs(amount) >= 1:
        return f"{amount:,.2f}"
    digits = 2
    while digits < 10 and abs(amount) < 10 ** (1 - digits):
        digits += 1
    text = f"{amount:.{digits}f}".rstrip("0")
    return text + "0" * (2 - len(text.partition(".")[2]))


@dataclass(frozen=True)
class JournalFile:
    uri: str
    kind: str
    lo: int
    hi: int
    writer: str
    spend: Spend


def files(root: str) -> list[JournalFile]:
    """The journal's files, parts superseded by their writer's merged file left out."""
    found = []
    for uri in io.ls(root, (".parquet",)):
        m = _NAME.match(uri.rsplit("/", 1)[-1])
        if m:
            kind, lo, hi, writer, _, n, p, c = m.groups()
            found.append(JournalFile(uri, kind, int(lo), int(hi), writer, Spend(int(n), int(p), int(c))))
    merged = {f.writer for f in found if f.kind == "merged"}
    return [f for f in found if f.kind == "merged" or f.writer not in merged]


def read_file(f: JournalFile) -> pl.DataFrame:
    """A journal file's rows. A storage failure is raised as it is (it may pass); a file that
    is not a journal table raises JournalFileError, naming it and what deleting it costs."""
    data = io.read_bytes(f.uri)
    try:
        table = pl.read_parquet(_io.BytesIO(data))
        missing = [c for c in JOURNAL if c not in table.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
    except (Exception, pl.exceptions.PanicException) as exc:  # a damaged file may make the reader panic
        raise JournalFileError(
            f"the request journal's file {f.uri} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): it was cut "
            f"short or damaged, and a retry would read it the same way. Delete it and rerun the "
            f"same command: what it held is then sent and paid for again ({f.spend.requests:,} "
            f"request{'s' if f.spend.requests != 1 else ''}, {f.spend.tokens:,} tokens), every other answer of the "
            "journal is replayed") from None
    return table


def spend(root: str, exclude_writer: str | None = None) -> Spend:
    """What the journal holds: every request it kept, and their tokens."""
    total = Spend()
    for f in files(root):
        if f.writer != exclude_writer:
            total += f.spend
    return total


@dataclass
class Budget:
    """A budget for what one model is paid (the teacher's, the evaluation's judge): tokens
    (prompt + completion) and/or dollars at the user's prices. None where no limit is set.
    `who` and `settings` name it in its message: whose budget, and the settings that set it."""

    tokens: int | None = None
    usd: float | None = None
    price_input_per_m: float = 0.0
    price_output_per_m: float = 0.0
    who: str = "teacher"
    settings: tuple[str, str] = ("teacher.budget_tokens", "teacher.budget_usd")

    def passes(self, spend: Spend) -> bool:
        """Whether `spend` is beyond the budget."""
        if self.tokens is not None and spend.tokens > self.tokens:
            return True
        return self.usd is not None and spend.usd(self.price_input_per_m, self.price_output_per_m) > self.usd

    def describe(self, spend: Spend) -> str:
        priced = self.price_input_per_m or self.price_output_per_m
        usd = spend.usd(self.price_input_per_m, self.price_output_per_m)
        cost = f"; ${dollars(usd)} at the prices set" if priced else ""
        limits = []
        if self.tokens is not None:
            limits.append(f"{self.settings[0]} {self.tokens:,}")
        if self.usd is not None:
            limits.append(f"{self.settings[1]} {dollars(self.usd)}")
        return (f"spent {spend.tokens:,} tokens ({spend.prompt_tokens:,} prompt, {spend.completion_tokens:,} "
                f"completion{cost}) in {spend.requests:,} requests, against "
                + " and ".join(limits))


class _Root:
    """What the journals of one root open in this process share, so that shards running at once
    (a batch engine's shards all wait at once) see each other's spend the moment it is kept and
    each other's requests in flight: the writers opened here, the spend of those closed, and
    the worst case of every request admitted and not yet returned."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # admitting reads the total under it
        self.live: set["Journal"] = set()
        self.writers: set[str] = set()
        self.closed = Spend()
        self.in_flight = Spend()


_ROOTS: dict[str, _Root] = {}
_ROOTS_LOCK = threading.Lock()


def _shared(root: str) -> _Root:
    with _ROOTS_LOCK:
        return _ROOTS.setdefault(root, _Root())


class Journal:
    """The journal of one shard attempt (one writer): what it can replay, and what it keeps."""

    def __init__(self, root: str, lo: int, hi: int, flush_seconds: float = 1.0):
        self.root, self.lo, self.hi = root, lo, hi
        self.writer = uuid.uuid4().hex[:12]
        self.shared = _shared(root)
        with self.shared.lock:
            self.shared.live.add(self)
            self.shared.writers.add(self.writer)
        self.flush_seconds = flush_seconds
        self._pending: list[dict[str, Any]] = []
        self._kept: list[dict[str, Any]] = []  # everything this writer journaled, for the merge
        self._parts: list[str] = []
        self._seq = 0
        self.mine = Spend()  # what this writer journaled
        self.others = Spend()  # what writers of other processes had kept at the last look
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.look()

    @property
    def batches(self) -> "BatchLedger":
        """The provider batches created for this writer's rows (engines.batch_api)."""
        return BatchLedger(io.join(self.root, "batches"), self.lo, self.hi)

    def load(self) -> dict[str, Generation]:
        """Every generation journaled for this writer's source rows (files that overlap them)."""
        wanted = [f for f in files(self.root) if f.lo <= self.hi and f.hi >= self.lo]
        found: dict[str, Generation] = {}
        for f in wanted:
            for row in read_file(f).iter_rows(named=True):
                found.setdefault(row["key"], Generation(
                    text=row["text"], prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
                    finish_reason=row["finish_reason"], constrained=row["constrained"]))
        return found

    def look(self) -> Spend:
        """Refresh what the rest of the journal holds (other workers; the shards of this process
        are counted as they keep, see `total`)."""
        with self.shared.lock:
            ours = set(self.shared.writers)
        others = Spend()
        for f in files(self.root):
            if f.writer not in ours:
                others += f.spend
        with self._lock:
            self.others = others
        return others

    @property
    def total(self) -> Spend:
        """Everything the journal holds: other processes' writers as last looked at, every
        writer of this process as it keeps."""
        with self.shared.lock:
            here = self.shared.closed
            for journal in self.shared.live:
                here += journal.mine
        with self._lock:
            return self.others + here

    def add(self, key: str, gen: Generation) -> None:
        row = {"key": key, "text": gen.text, "prompt_tokens": gen.prompt_tokens,
               "completion_tokens": gen.completion_tokens, "finish_reason": gen.finish_reason,
               "constrained": gen.constrained}
        with self._lock:
            self._pending.append(row)
            self.mine += Spend(1, gen.prompt_tokens, gen.completion_tokens)
        self._start()

    def flush(self) -> None:
        """Write what is buffered as one part file."""
        with self._write_lock:
            with self._lock:
                rows, self._pending = self._pending, []
            if not rows:
                return
            self._seq += 1
            uri = io.join(self.root, self._name("part", self._seq, rows))
            try:
                records.write(pl.DataFrame(rows, schema=JOURNAL), uri)
            except BaseException:
                with self._lock:  # kept for the next try
                    self._pending[:0] = rows
                raise
            self._parts.append(uri)
            self._kept += rows

    def close(self, merge: bool) -> None:
        """Stop the flusher and write what is left; `merge` (the shard finished): this writer's
        parts become one file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.flush()
        with self.shared.lock:
            if self in self.shared.live:
                self.shared.live.discard(self)
                self.shared.closed += self.mine
        if merge and self._parts:
            records.write(pl.DataFrame(self._kept, schema=JOURNAL),
                           io.join(self.root, self._name("merged", 0, self._kept)))
            for uri in self._parts:
                io.remove(uri)
            self._parts = []

    def _name(self, kind: str, seq: int, rows: list[dict[str, Any]]) -> str:
        p = sum(r["prompt_tokens"] for r in rows)
        c = sum(r["completion_tokens"] for r in rows)
        return f"{kind}-{self.lo:010d}-{self.hi:010d}-{self.writer}-{seq:06d}-{len(rows)}-{p}-{c}.parquet"

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._flusher, name="journal", daemon=True)
                    self._thread.start()

    def _flusher(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
                self.look()
            except Exception:  # storage hiccup: the next tick or close() writes it
                pass


class BatchLedger:
    """Provider batches, each kept as one small JSON file the moment it is created (and before,
    as an intent), named by the source rows it covers so a shard reads only its own:

        batch-<lo>-<hi>-<tag>.json   {"tag", "provider", "id", "keys", "created"}
    """

    def __init__(self, root: str, lo: int, hi: int):
        self.root, self.lo, self.hi = root, lo, hi

    def find(self, keys: set[str]) -> list[dict[str, Any]]:
        """The batches holding any of `keys`, among those of overlapping rows."""
        found = []
        for uri in io.ls(self.root, (".json",)):
            m = _BATCH.match(uri.rsplit("/", 1)[-1])
            if m and int(m.group(1)) <= self.hi and int(m.group(2)) >= self.lo:
                entry = io.read_json(uri)
                if keys.intersection(entry["keys"]):
                    found.append(entry)
        return found

    def record(self, entry: dict[str, Any]) -> None:
        io.write_json(entry, io.join(self.root, f"batch-{self.lo:010d}-{self.hi:010d}-{entry['tag']}.json"))


_BATCH = re.compile(r"^batch-(\d+)-(\d+)-([0-9a-f]+)\.json$")


@contextmanager
def behind(engine: Any, root: str, lo: int = 0, hi: int = 0, budget: Budget | None = None) -> Iterator[JournaledTeacher]:
    """`engine` behind the request journal at `root` (a writer for source rows lo..hi) and
    `budget`: what every model that is paid (the teacher, the evaluation's judge) answers
    through. The writer's parts are merged when the work inside finishes."""
    kept = Journal(root, lo, hi)
    finished = False
    try:
        yield JournaledTeacher(engine, kept, budget)
        finished = True
    finally:
        kept.close(merge=finished)


class JournaledTeacher:
    """A teacher engine behind the journal and the budget (reflection.TeacherEngine): chats
    already journaled are answered from it; the rest go to the engine, each admitted by the
    budget first and journaled as it returns. When the budget refuses a request, nothing more
    is sent, requests in flight finish and are kept, and BudgetExceededError is raised."""

    def __init__(self, engine: Any, journal: Journal, budget: Budget | None = None):
        self.engine, self.journal, self.budget = engine, journal, budget
        self.teacher_id = engine.teacher_id
        # who answers, as keys know it: not where it was reached (openai_compat.identity)
        self.identity = getattr(engine, "identity", None) or engine.teacher_id
        self.found = journal.load()
        self.sent = Spend()
        self.answered = Spend()  # of those sent, the ones answered: a refused request (400) is sent, not answered
        self.replayed = Spend()
        self.batches: Counter[str] = Counter()  # a batch API's batches and lines, for this shard
        self._lock = threading.Lock()

    def generate(self, chats, sampling, progress: Callable[[int, int], None] | None = None, formats=None, *,
                 admit=None, done=None) -> list[Generation]:
        from reflectune.engines.openai_compat import prompt_tokens

        n = len(chats)
        wanted = formats if formats is not None and sampling.constrained != "off" else [None] * n
        keys = [request_key(self.identity, chat, sampling, fmt) for chat, fmt in zip(chats, wanted)]
        # a journal written before keys were by identity replays at the endpoint it was written at
        out: list[Generation | None] = [
            self.found.get(k) or self.found.get(request_key(self.teacher_id, chat, sampling, fmt, version=1))
            for k, chat, fmt in zip(keys, chats, wanted)]
        hits = [g for g in out if g is not None]
        for gen in hits:
            self.replayed += Spend(1, gen.prompt_tokens, gen.completion_tokens)
        if hits and progress:
            progress(len(hits), sum(g.completion_tokens for g in hits))
        missing = [i for i in range(n) if out[i] is None]
        if not missing:
            return out
        held: dict[int, Spend] = {}

        shared = self.journal.shared  # every shard of this process admits against the same spend

        def admitted(j: int) -> bool:
            worst = Spend(1, prompt_tokens(chats[missing[j]]), sampling.max_new_tokens)
            with shared.lock:
                if j in held:  # asked again (another form after a 400 refused the first): one reservation
                    release(j)
                if self.budget is not None and self.budget.passes(self.journal.total + shared.in_flight + worst):
                    return False
                shared.in_flight += worst
                held[j] = worst
            return True

        def release(j: int) -> None:
            worst = held.pop(j)
            shared.in_flight += Spend(-worst.requests, -worst.prompt_tokens, -worst.completion_tokens)

        def returned(j: int, gen: Generation) -> None:
            if gen.error is None:  # kept before its reservation ends: the spend never dips in between
                self.journal.add(keys[missing[j]], gen)
                self.found[keys[missing[j]]] = gen
            with shared.lock:
                if j in held:
                    release(j)
            with self._lock:
                self.sent += Spend(1, gen.prompt_tokens, gen.completion_tokens)
                if gen.error is None:
                    self.answered += Spend(1, gen.prompt_tokens, gen.completion_tokens)

        # a batch API's lines are named by their keys, and its batches kept beside the journal
        batched = {"keys": [keys[i] for i in missing], "ledger": self.journal.batches, "tally": self.batches} \
            if getattr(self.engine, "submits_batches", False) else {}
        try:
            gens = self.engine.generate([chats[i] for i in missing], sampling, progress,
                                        [formats[i] for i in missing] if formats is not None else None,
                                        admit=admitted if self.budget is not None else None, done=returned,
                                        **batched)
        finally:
            with shared.lock:  # whatever did not come back is no longer in flight
                for j in list(held):
                    release(j)
        for j, i in enumerate(missing):
            out[i] = gens[j]
        if any(g.error == NOT_SENT for g in gens):
            self.journal.flush()
            raise BudgetExceededError(f"the {self.budget.who} budget would be passed by the next request: "
                                      f"{self.budget.describe(self.journal.total)}")
        return out

    def close(self) -> None:
        pass
