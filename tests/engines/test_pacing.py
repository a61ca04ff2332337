"""Pacing by a provider's limits: the rate-limit headers of OpenAI and Anthropic read, the
limits kept against the provider emulator, 429s alone where no headers come, Retry-After
pausing every request, and concurrency backing off and growing back."""

import re
from datetime import datetime, timedelta, timezone

import pytest

from reflectune import prompts
from reflectune.emulator import Emulator
from reflectune.engines.openai_compat import OpenAITeacher
from reflectune.engines.pacing import Pacer, parse_duration, stated_limits
from reflectune.reflection import Sampling


def test_openai_and_anthropic_headers_are_read():
    openai = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "598",
              "x-ratelimit-reset-requests": "200ms", "x-ratelimit-limit-tokens": "150000",
              "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "1m0.4s"}
    got = stated_limits(openai)
    assert (got["requests"].limit, got["requests"].remaining, got["requests"].reset) == (600, 598, pytest.approx(0.2))
    assert (got["tokens"].limit, got["tokens"].remaining, got["tokens"].reset) == (150000, 149000, pytest.approx(60.4))
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    anthropic = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
                 "anthropic-ratelimit-requests-reset": (now + timedelta(seconds=1.2)).isoformat(),
                 "anthropic-ratelimit-input-tokens-limit": "40000", "anthropic-ratelimit-input-tokens-remaining": "39000",
                 "anthropic-ratelimit-input-tokens-reset": (now + timedelta(seconds=1.5)).isoformat().replace("+00:00", "Z")}
    got = stated_limits(anthropic, now_utc=now)
    assert got["requests"].reset == pytest.approx(1.2) and got["input_tokens"].remaining == 39000
    assert "tokens" not in got and stated_limits({"content-type": "application/json"}) == {}
    assert [parse_duration(t) for t in ("1s", "6m0s", "20ms", "1h2m3.5s", "7", "soon")] == [1, 360, 0.02, 3723.5, 7, None]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_429_pauses_every_request_and_halves_concurrency_once_per_round():
    clock = Clock()
    pacer = Pacer(16, clock=clock)
    tickets = [pacer._take(100, 50) for _ in range(8)]
    pacer.release(tickets[0], 429, retry_after=2.0)
    assert pacer.window == 8 and pacer._wait(100, 50) >= 2.0
    # the other requests of the same round meet the same limit: no further cut for them
    for t in tickets[1:4]:
        pacer.release(t, 429, retry_after=2.0)
    assert pacer.window == 8 and pacer.rate_limited == 4
    clock.now += 2.0
    later = pacer._take(100, 50)
    pacer.release(later, 429)  # a request sent after the cut: a new round
    assert pacer.window == 4
    for t in tickets[4:]:
        pacer.release(t, 200, usage=(100, 50))
    assert pacer.window > 4  # grows back by one per round of successes


def test_stated_limits_are_kept_before_the_provider_must_refuse():
    clock = Clock()
    pacer = Pacer(64, clock=clock)
    first = pacer._take(100, 100)
    headers = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "2",
               "x-ratelimit-reset-requests": "8s"}
    pacer.release(first, 200, headers, usage=(100, 100))
    # 2 left, refilled at (10 - 2) / 8 s = 1 per second
    assert pacer.buckets["requests"].rate == pytest.approx(1.0)
    pacer._take(100, 100)
    pacer._take(100, 100)
    assert pacer._wait(100, 100) == pytest.approx(1 / 0.97, rel=0.01)


def test_a_429_without_headers_where_limits_are_stated_pauses_and_keeps_the_stated_pace():
    """A gateway's 429 states no limits while the 200s do: the pause of its Retry-After, then
    the stated pace again; no rate is guessed from the 429 (it was once 0.7 / Retry-After)."""
    clock = Clock()
    pacer = Pacer(4, clock=clock)
    first = pacer._take(100, 100)
    headers = {"x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "60s"}  # 30 a minute: one each 2 s
    pacer.release(first, 200, headers, usage=(100, 100))
    clock.now += 2.0
    refused = pacer._take(100, 100)
    pacer.release(refused, 429, {"retry-after": "20"}, retry_after=20.0)
    assert pacer.rate is None and pacer.window == 2
    assert pacer._wait(100, 100) == pytest.approx(20.0)
    assert pacer.holding() == (pytest.approx(20.0), "rate limited")
    clock.now += 20.0  # the bucket refilled while paused: requests go at the stated pace again
    gaps = []
    for _ in range(5):
        wait = pacer._wait(100, 100)
        clock.now += max(wait, 0.0)
        gaps.append(max(wait, 0.0))
        pacer.release(pacer._take(100, 100), 200, usage=(100, 100))
    assert sum(gaps) <= 5 * 2.0 / 0.97 + 0.01, gaps


def test_a_429_without_headers_before_the_first_answer_does_not_slow_the_run():
    """The first round meets the limit before any answer stated it; the 429s state nothing (a
    gateway's): once answers state the limits, they pace, at the limit."""
    # 16 at once against 4 a second, answers after 0.3 s: the first round meets the limit even on a
    # machine so busy that sending it takes a second
    with Emulator(rpm=4, window=1.0, bare_429=True, latency=0.3) as emulator:
        engine, stats = run(emulator, 48, concurrency=16)
        utilisation = emulator.utilisation()
    assert stats["statuses"].get("429", 0) >= 1, stats
    assert engine.pacer.rate is None
    assert utilisation >= 0.7, (utilisation, stats)
    # every answer paid for is one the engine counted, none twice
    assert (engine.usage.prompt_tokens, engine.usage.completion_tokens) == (stats["prompt_tokens"],
                                                                            stats["completion_tokens"])


def test_the_progress_note_says_when_requests_wait_on_a_rate_limit():
    notes = []

    def progress(done, tokens, note=None):
        if note is not None:
            notes.append(note)

    # two requests each 10 s: the third waits about 5 s
    with Emulator(rpm=2, window=10.0, latency=0.01) as emulator:
        engine = OpenAITeacher("emulated", base_url=emulator.url, api_key="sk-test", concurrency=4,
                               backoff_base=0.2, backoff_max=2.0)
        gens = engine.generate(chats(3), Sampling(max_new_tokens=64), progress)
    assert all(g.error is None for g in gens)
    waits = [n for n in notes if n]
    assert waits and all(re.fullmatch(r"waiting \d+ s: (rate limited|requests limit)", n) for n in waits), notes
    assert notes[-1] == ""  # said no more once the wait is over


def chats(n):
    return [prompts.response_reflection(f"Question {i} about a topic", "", f"Answer {i} " * (i % 17 + 3))
            for i in range(n)]


def run(emulator, n, concurrency=16):
    engine = OpenAITeacher("emulated", base_url=emulator.url, api_key="sk-test", concurrency=concurrency,
                           backoff_base=0.2, backoff_max=2.0)
    gens = engine.generate(chats(n), Sampling(max_new_tokens=256))
    assert all(g.error is None for g in gens)
    stats = emulator.snapshot()
    assert stats["answered"] == n and stats["duplicates"] == 0
    return engine, stats


@pytest.mark.parametrize("style", ["openai", "anthropic"])
def test_pacing_by_headers_stays_under_the_limits_and_near_them(style):
    # 120 requests and 36,000 tokens per 2 s (3,600 and 1.08M a minute): tokens bind
    window, rpm, tpm = 2.0, 120, 36000
    with Emulator(rpm=rpm, tpm=tpm, window=window, headers=style, latency=0.05) as emulator:
        engine, stats = run(emulator, 300)
        utilisation = emulator.utilisation()
    refused = stats["statuses"].get("429", 0)
    assert refused <= 0.01 * stats["answered"], stats
    assert utilisation >= 0.85, (utilisation, stats)
    assert engine.usage.rate_limited == refused


def test_without_headers_the_429s_alone_pace_the_requests():
    with Emulator(rpm=100, window=2.0, headers="none", latency=0.02) as emulator:
        engine, stats = run(emulator, 500)
    refused = stats["statuses"].get("429", 0)
    assert refused <= 0.05 * stats["answered"], stats
    assert engine.pacer.rate is not None and engine.usage.rate_limited == refused


def test_a_prefect_global_rate_limit_holds_the_requests_of_every_worker(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from reflectune.errors import SettingError
    from reflectune.tasks.shards import _shared_limit

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="teacher-rps", limit=10, slot_decay_per_second=10.0))
    with Emulator(latency=0.01) as emulator:
        engine = OpenAITeacher("emulated", base_url=emulator.url, api_key="sk-test", concurrency=16)
        engine.shared_limit = _shared_limit("teacher-rps")
        gens = engine.generate(chats(60), Sampling(max_new_tokens=64))
        assert all(g.error is None for g in gens)
        times = [t for t, _ in emulator.stats.times]
        # 10 slots at once, then 10 a second as they decay: 50 more take about 5 s
        assert times[-1] - times[0] >= 3.5
        assert 49 / (times[-1] - times[10]) <= 12.0
        engine.shared_limit = _shared_limit("no-such-limit")
        with pytest.raises(SettingError, match="teacher.rate_limit 'no-such-limit'.*prefect gcl create"):
            engine.generate(chats(1), Sampling(max_new_tokens=64))
