"""Pacing requests to an API by the limits it states, its 429s and its Retry-After.

Providers keep their limits as token buckets and state them in every answer: OpenAI as
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, Anthropic as
`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`.
The pacer keeps a copy of each bucket: a request is sent only when the copy holds what the
request will take (one request; its estimated tokens), and every answer brings the copy down
to what the provider says is left. The refill rate comes from the same headers: a bucket
`limit - remaining` short that is full again in `reset` seconds refills at their ratio.

Concurrency backs off on a 429 (halved, once per round of requests in flight) and grows back
by one per round of successes, and a Retry-After pauses every request, not only the one that
got it. A server that states no limits (`vllm serve`) is paced by its 429s alone: each round that
meets one sets a request rate a little under what the server kept up with, and it grows
by 1% a second while requests succeed. Where answers state limits, a 429 that states none (a
gateway's, or one sent before any answer stated them) learns no rate: the stated limits stay
the pace, the copies of the buckets are emptied (the provider's were) and refill at their rate.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

# what a request takes from each kind of bucket: (prompt tokens, completion tokens) -> units
KINDS = {
    "requests": lambda p, c: 1.0,
    "tokens": lambda p, c: p + c,
    "input_tokens": lambda p, c: p,
    "output_tokens": lambda p, c: c,
}
SAFETY = 0.97  # the copy refills a little slower than the provider's bucket: rounding never overdraws it
GROWTH = 0.01  # learned rate (no headers): growth per second while requests succeed
CUT = 0.7  # learned rate: share of the rate kept up with, per round that met a 429


@dataclass
class Bucket:
    capacity: float
    rate: float  # units per second
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate * SAFETY)
        self.stamp = now

    def wait(self, amount: float) -> float:
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / (self.rate * SAFETY)


@dataclass
class Ticket:
    """One request admitted: what it was expected to take, and what had been taken before it."""

    seq: int
    prompt: float
    completion: float
    taken_before: dict[str, float] = field(default_factory=dict)


@dataclass
class Stated:
    """One limit as an answer states it."""

    limit: float
    remaining: float
    reset: float | None  # seconds until the bucket is full again


class Pacer:
    def __init__(self, max_concurrency: int, clock: Any = time.monotonic):
        self.max = max_concurrency
        self.window = float(max_concurrency)
        self.in_flight = 0
        self.buckets: dict[str, Bucket] = {}
        self.rate: float | None = None  # requests/s learned from 429s, where no limits are stated
        self._rate_level, self._rate_stamp = 1.0, 0.0
        self.pause_until = 0.0
        self.seq = 0
        self.cut_at = -1  # the last request sent before the latest cut: its round is over
        self.taken: dict[str, float] = {kind: 0.0 for kind in KINDS}  # charged by this client, ever
        self.completion_mean: float | None = None
        self.rate_limited = 0  # 429s seen
        self.successes: deque[float] = deque(maxlen=2048)
        self._asked = (0.0, 0.0)  # the latest request's estimate, for `holding`
        self._clock = clock
        self._lock = threading.Lock()

    # -- before a request ----------------------------------------------------------------------

    def estimate(self, prompt_tokens: float, max_tokens: int) -> tuple[float, float]:
        """Expected (prompt, completion) tokens of a request: completions run as the recent ones."""
        expected = self.completion_mean if self.completion_mean is not None else min(max_tokens, 512)
        return prompt_tokens, min(float(max_tokens), expected)

    async def acquire(self, prompt: float, completion: float) -> Ticket:
        while True:
            with self._lock:
                self._asked = (prompt, completion)
                wait = self._wait(prompt, completion)
                if wait <= 0:
                    return self._take(prompt, completion)
            await asyncio.sleep(min(max(wait, 0.002), 0.25))

    def _wait(self, prompt: float, completion: float) -> float:
        now = self._clock()
        wait = self.pause_until - now
        if self.in_flight >= int(self.window):
            wait = max(wait, 0.005)
        for kind, bucket in self.buckets.items():
            bucket.refill(now)
            wait = max(wait, bucket.wait(KINDS[kind](prompt, completion)))
        if self.rate is not None:
            self._rate_level = min(1.0, self._rate_level + (now - self._rate_stamp) * self.rate)
            self._rate_stamp = now
            if self._rate_level < 1.0:
                wait = max(wait, (1.0 - self._rate_level) / self.rate)
        return wait

    def _take(self, prompt: float, completion: float) -> Ticket:
        ticket = Ticket(self.seq, prompt, completion, dict(self.taken))
        self.seq += 1
        self.in_flight += 1
        for kind in KINDS:
            amount = KINDS[kind](prompt, completion)
            self.taken[kind] += amount
            if kind in self.buckets:
                self.buckets[kind].level -= amount
        if self.rate is not None:
            self._rate_level -= 1.0
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """A ticket not used after all: nothing was sent."""
        with self._lock:
            self.in_flight -= 1
            for kind in KINDS:
                amount = KINDS[kind](ticket.prompt, ticket.completion)
                self.taken[kind] -= amount
                if kind in self.buckets:
                    self.buckets[kind].level += amount
            if self.rate is not None:
                self._rate_level += 1.0

    # -- after it ------------------------------------------------------------------------------

    def release(self, ticket: Ticket, status: int | None, headers: Any = None, usage: tuple[int, int] | None = None,
                retry_after: float | None = None) -> None:
        """Account for an answer: `status` (None when no answer came), its headers, its
        (prompt, completion) usage."""
        with self._lock:
            now = self._clock()
            self.in_flight -= 1
            # the estimate was charged when it was sent: settle it with what the answer used; a
            # 429 took nothing
            used = usage if usage is not None else (0, 0) if status == 429 else None
            own = {kind: KINDS[kind](ticket.prompt, ticket.completion) for kind in KINDS}
            if used is not None:
                for kind in KINDS:
                    delta = own[kind] - KINDS[kind](*used)
                    own[kind] -= delta
                    self.taken[kind] -= delta
                    if kind in self.buckets:
                        bucket = self.buckets[kind]
                        bucket.level = min(bucket.capacity, bucket.level + delta)
            if usage is not None:
                c = float(usage[1])
                self.completion_mean = c if self.completion_mean is None else 0.9 * self.completion_mean + 0.1 * c
            stated = stated_limits(headers, now_utc=datetime.now(timezone.utc))
            for kind, s in stated.items():
                self._sync(kind, s, ticket, own[kind], now)
            if stated:
                self.rate = None  # the provider states its limits: they pace, not a rate guessed from 429s
            if status == 429:
                self.rate_limited += 1
                if retry_after:
                    self.pause_until = max(self.pause_until, now + retry_after)
                if not stated and self.buckets:
                    # limits stated before, none now: the provider's bucket is empty, so the copies
                    # are; they refill at the stated rate
                    for bucket in self.buckets.values():
                        bucket.refill(now)
                        bucket.level = min(bucket.level, 0.0)
                if ticket.seq > self.cut_at:  # one cut per round of requests in flight
                    self.cut_at = self.seq - 1
                    self.window = max(1.0, self.window / 2)
                    if not stated and not self.buckets:
                        self._learn_rate(now, retry_after)
            elif status is not None and status < 400:
                self.successes.append(now)
                self.window = min(float(self.max), self.window + 1.0 / self.window)
                if self.rate is not None:
                    self.rate += GROWTH  # per success: the rate grows by GROWTH of itself per second

    def holding(self) -> tuple[float, str] | None:
        """What holds the next request back now, for a person watching: (seconds, why), or
        None when nothing but the concurrency limit does."""
        with self._lock:
            now = self._clock()
            prompt, completion = self._asked
            waits = [(self.pause_until - now, "rate limited")]
            for kind, bucket in self.buckets.items():
                bucket.refill(now)
                waits.append((bucket.wait(KINDS[kind](prompt, completion)), f"{kind.replace('_', ' ')} limit"))
            if self.rate is not None:
                level = min(1.0, self._rate_level + (now - self._rate_stamp) * self.rate)
                waits.append(((1.0 - level) / self.rate, "paced after 429s"))
        seconds, why = max(waits)
        return (seconds, why) if seconds > 0 else None

    def _sync(self, kind: str, s: Stated, ticket: Ticket, own: float, now: float) -> None:
        """Bring the copy of a bucket to what the provider says is left, less what was sent
        after this request (the provider had not counted that yet)."""
        after = self.taken[kind] - ticket.taken_before[kind] - own
        left = s.remaining - max(0.0, after)
        known = self.buckets.get(kind)
        rate = known.rate if known else s.limit / 60.0  # providers state limits per minute
        if s.reset and s.reset > 0.01 and s.limit - s.remaining >= 1:
            rate = (s.limit - s.remaining) / s.reset
        if known is None:
            self.buckets[kind] = Bucket(s.limit, rate, left, now)
        else:
            known.refill(now)
            known.capacity, known.rate, known.level = s.limit, rate, min(known.level, left)

    def _learn_rate(self, now: float, retry_after: float | None) -> None:
        """A 429 without stated limits: pace at a little under the rate the server has kept
        up with lately (a server answering 429 is saturated), else under the rate in force,
        else at what an empty bucket's Retry-After implies."""
        recent = [t for t in self.successes if t >= now - 5.0]
        span = now - recent[0] if len(recent) > 1 else 0.0
        candidates = [len(recent) / span] if span >= 2.0 else []
        if self.rate is not None:
            candidates.append(self.rate)
        if not candidates:
            candidates.append(1.0 / retry_after if retry_after else max(1.0, len(recent)))
        self.rate = max(0.01, CUT * min(candidates))
        self._rate_level, self._rate_stamp = min(self._rate_level, 0.0), now


def stated_limits(headers: Any, now_utc: datetime | None = None) -> dict[str, Stated]:
    """The limits an answer states, by kind (requests, tokens, input_tokens, output_tokens);
    empty when it states none."""
    if headers is None:
        return {}
    out = {}
    for kind in KINDS:
        name = kind.replace("_", "-")
        openai = (f"x-ratelimit-limit-{name}", f"x-ratelimit-remaining-{name}", f"x-ratelimit-reset-{name}")
        anthropic = tuple(f"anthropic-ratelimit-{name}-{part}" for part in ("limit", "remaining", "reset"))
        for limit_h, remaining_h, reset_h in (openai, anthropic):
            limit, remaining = _number(headers.get(limit_h)), _number(headers.get(remaining_h))
            if limit is None or remaining is None or limit <= 0:
                continue
            reset_text = headers.get(reset_h)
            reset = parse_duration(reset_text) if reset_h.startswith("x-") else _until(reset_text, now_utc)
            out[kind] = Stated(limit, remaining, reset)
    return out


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset times: `1s`, `6m0s`, `20ms`, `1h2m3.5s`; a bare number is seconds."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}.get(unit)
        if scale is None or not number:
            return None
        total += float(number) * scale
        number = ""
        i += len(unit)
    return total if not number else None


def _until(stamp: str | None, now_utc: datetime | None) -> float | None:
    """Seconds until an RFC 3339 time (Anthropic's reset headers)."""
    if not stamp:
        return None
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (at - (now_utc or datetime.now(timezone.utc))).total_seconds())


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
