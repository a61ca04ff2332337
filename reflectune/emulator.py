"""A paid teacher API on loopback: the OpenAI chat-completions protocol with a provider's
limits, faults and latency, for trying a run's pacing, journal and budget without paying.

    python -m reflectune.emulator --port 8100 --rpm 600 --tpm 150000 --latency 0.2

Answers are deterministic (a hash of the request seeds them) and come in the form asked:
free text with the reflection markers, or a JSON object for a `response_format` JSON schema.
Like OpenAI, it refuses vLLM's own request fields (`structured_outputs`) with 400.

Limits are token buckets, as providers keep them: `requests` and `tokens` per `window`
seconds, refilled continuously. Each answer states them in rate-limit headers (OpenAI's
`x-ratelimit-*` or Anthropic's `anthropic-ratelimit-*` names, or none, as `vllm serve`); a
request beyond them gets 429 with Retry-After. Faults: 5xx answers and dropped connections at
set rates. The log counts every distinct request it answered, so a test can tell what was
paid for twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEADER_STYLES = ("openai", "anthropic", "none")
# known to OpenAI's API: anything else in a request body is refused, as the real API does
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
                "response_format", "stop", "stream", "user", "frequency_penalty", "presence_penalty", "logprobs"}

WORDS = ("analysis answer approach argument balance careful clear compare concept context data define detail "
         "develop example explain fact figure focus general guide history idea impact include insight issue key "
         "knowledge language level logic method model note order outline pattern period point practice precise "
         "principle problem process question range reason relevant result review rule sample scope section sense "
         "simple solution source specific step structure study summary support system task term theory topic "
         "value view word work yield accurate better complete consider describe evaluate identify improve "
         "measure organize present provide relate require respond select state test verify").split()


def count_tokens(text: str) -> int:
    """The emulator's token count: about four characters a token, as English prose runs."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


@dataclass
class Bucket:
    """A provider's limit: `capacity` units, refilled continuously over `window` seconds."""

    capacity: float
    window: float
    level: float = -1.0
    stamp: float = 0.0

    def refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.stamp = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / self.window)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is)."""
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing * self.window / self.capacity

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) * self.window / self.capacity


@dataclass
class Stats:
    answered: Counter = field(default_factory=Counter)  # request key -> 200 answers
    statuses: Counter = field(default_factory=Counter)  # "200", "429", "500", "drop", "400"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    times: list[tuple[float, int]] = field(default_factory=list)  # when each 200 was sent, and its tokens

    def as_dict(self) -> dict[str, Any]:
        return {"answered": sum(self.answered.values()), "distinct": len(self.answered),
                "duplicates": sum(n - 1 for n in self.answered.values()), "statuses": dict(self.statuses),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "first": self.times[0][0] if self.times else None, "last": self.times[-1][0] if self.times else None}

    def rate(self, since: float) -> tuple[float, float]:
        """Requests and tokens answered per second from `since` (monotonic) to the last answer."""
        later = [(t, n) for t, n in self.times if t >= since]
        if len(later) < 2:
            return 0.0, 0.0
        span = later[-1][0] - later[0][0]
        return (len(later) - 1) / span, sum(n for _, n in later[1:]) / span


class Emulator:
    """The server, in a thread of this process; `url` ends in /v1."""

    def __init__(self, *, rpm: int | None = None, tpm: int | None = None, window: float = 60.0,
                 headers: str = "openai", latency: float = 0.05, latency_per_token: float = 0.0,
                 error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, answer_words: tuple[int, int] = (40, 120), echo_errors: str | None = None):
        if headers not in HEADER_STYLES:
            raise ValueError(f"headers '{headers}': choose one of {', '.join(HEADER_STYLES)}")
        self.window = window
        self.requests = Bucket(rpm, window) if rpm else None
        self.tokens = Bucket(tpm, window) if tpm else None
        self.headers, self.latency, self.latency_per_token = headers, latency, latency_per_token
        self.error_rate, self.drop_rate = error_rate, drop_rate
        self.answer_words = answer_words
        self.echo_errors = echo_errors  # a 400 body that echoes the request's Authorization header
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.stats = Stats()
        self._server = _Server((host, port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="emulator", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.stats.as_dict()

    def utilisation(self) -> float:
        """The answered rate against the binding limit, once the bucket's first fill is spent:
        from one window after the first answer to the last."""
        with self._lock:
            if not self.stats.times:
                return 0.0
            requests, tokens = self.stats.rate(self.stats.times[0][0] + self.window)
        return max(requests * self.window / self.requests.capacity if self.requests else 0.0,
                   tokens * self.window / self.tokens.capacity if self.tokens else 0.0)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request --------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        """(status, headers, JSON body or None to drop the connection) for a request body."""
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown or not isinstance(body.get("messages"), list):
            with self._lock:
                self.stats.statuses["400"] += 1
            what = f"Unrecognized request argument supplied: {', '.join(unknown)}" if unknown else "messages missing"
            return 400, {}, _error(what, "invalid_request_error")
        key = request_key(body)
        text, finish = self._completion(body, key)
        prompt = sum(count_tokens(str(m.get("content", ""))) + 4 for m in body["messages"])
        completion = count_tokens(text)
        with self._lock:
            now = time.monotonic()
            for bucket in (self.requests, self.tokens):
                if bucket:
                    bucket.refill(now)
            wait = max(self.requests.wait(1) if self.requests else 0.0,
                       self.tokens.wait(prompt + completion) if self.tokens else 0.0)
            if wait > 0:
                self.stats.statuses["429"] += 1
                headers = self._limit_headers() | {"retry-after": str(max(1, math.ceil(wait))),
                                                   "retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
                return 429, headers, _error("Rate limit reached: retry after the time in Retry-After", "rate_limit")
            if self.requests:
                self.requests.level -= 1
            if self.tokens:
                self.tokens.level -= prompt + completion
            headers = self._limit_headers()
            roll = self._random.random()
        if roll < self.drop_rate:
            with self._lock:
                self.stats.statuses["drop"] += 1
            return 0, {}, None
        if roll < self.drop_rate + self.error_rate:
            status = 500 if roll < self.drop_rate + self.error_rate / 2 else 503
            with self._lock:
                self.stats.statuses[str(status)] += 1
            return status, {}, _error("The server had an error while processing your request", "server_error")
        time.sleep(self.latency + self.latency_per_token * completion)
        with self._lock:
            self.stats.statuses["200"] += 1
            self.stats.answered[key] += 1
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += completion
            self.stats.times.append((time.monotonic(), prompt + completion))
        return 200, headers, {
            "id": f"chatcmpl-{key[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }

    def _limit_headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None or self.headers == "none":
                continue
            limit, remaining, reset = int(bucket.capacity), max(0, int(bucket.level)), bucket.reset()
            if self.headers == "openai":
                out |= {f"x-ratelimit-limit-{name}": str(limit), f"x-ratelimit-remaining-{name}": str(remaining),
                        f"x-ratelimit-reset-{name}": _duration(reset)}
            else:
                at = datetime.now(timezone.utc) + timedelta(seconds=reset)
                out |= {f"anthropic-ratelimit-{name}-limit": str(limit),
                        f"anthropic-ratelimit-{name}-remaining": str(remaining),
                        f"anthropic-ratelimit-{name}-reset": at.isoformat(timespec="milliseconds")}
        return out

    def _completion(self, body: dict[str, Any], key: str) -> tuple[str, str]:
        """The answer to a request, in the form it asks for, and its finish reason."""
        rng = random.Random(key)
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
        system = " ".join(str(m.get("content", "")) for m in body["messages"])
        lo, hi = self.answer_words
        if schema:
            obj: dict[str, Any] = {}
            for name, spec in schema.get("properties", {}).items():
                if spec.get("type") == "integer":
                    obj[name] = rng.randint(spec.get("minimum", 1), spec.get("maximum", 10))
                else:
                    size = (lo // 2, hi // 2) if name == "new_instruction" else (lo, hi)
                    obj[name] = words(*size).capitalize()[: spec.get("maxLength", 10**6)].strip() or "Answer"
            text = json.dumps(obj)
        elif "[New Instruction]" in system:
            text = (f"{words(15, 30).capitalize()}.\n[New Instruction] {words(lo // 3, hi // 3).capitalize()}? [End]\n"
                    f"[New Answer] {words(lo, hi).capitalize()}. [End]")
        elif "[Better Answer]" in system:
            text = f"{words(15, 30).capitalize()}.\n[Better Answer] {words(lo, hi).capitalize()}. [End]"
        else:
            text = words(lo, hi).capitalize() + "."
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit and count_tokens(text) > limit:
            return text[: 4 * int(limit)], "length"
        return text, "stop"


def request_key(body: dict[str, Any]) -> str:
    """What makes two requests the same request: the whole body but the stream flag."""
    shown = {k: v for k, v in body.items() if k != "stream"}
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 6m0s, 1.5s, 20ms."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, timed out) is not the server's error: quiet."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler(emulator: Emulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of an API

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {}, {"object": "list", "data": [{"id": "emulated", "object": "model"}]})
            elif self.path.startswith("/emulator/stats"):
                self._send(200, {}, emulator.snapshot())
            elif self.path in ("/health", "/"):
                self._send(200, {}, {"status": "ok"})
            else:
                self._send(404, {}, _error(f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.startswith("/emulator/reset"):
                emulator.reset_stats()
                return self._send(200, {}, {"reset": True})
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {}, _error(f"no route {self.path}", "not_found"))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return self._send(400, {}, _error("the body is not JSON", "invalid_request_error"))
            if emulator.echo_errors and emulator.echo_errors in json.dumps(body):
                # a careless server that echoes the request's credentials in its error
                return self._send(400, {}, _error(f"bad request from {self.headers.get('authorization')}",
                                                  "invalid_request_error"))
            status, headers, answer = emulator.answer(body)
            if answer is None:  # a dropped connection: no answer at all
                self.close_connection = True
                self.connection.close()
                return
            self._send(status, headers, answer)

        def _send(self, status: int, headers: dict[str, str], obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflectune.emulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--rpm", type=int, help="requests per window (default: unlimited)")
    parser.add_argument("--tpm", type=int, help="tokens (prompt + completion) per window (default: unlimited)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the limits are stated for")
    parser.add_argument("--headers", choices=HEADER_STYLES, default="openai", help="rate-limit header names")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    parser.add_argument("--latency-per-token", type=float, default=0.0, help="added seconds per completion token")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500 or 503")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped unanswered")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    emulator = Emulator(rpm=args.rpm, tpm=args.tpm, window=args.window, headers=args.headers, latency=args.latency,
                        latency_per_token=args.latency_per_token, error_rate=args.error_rate,
                        drop_rate=args.drop_rate, seed=args.seed, port=args.port)
    print(f"emulated teacher API at {emulator.url} (model name: any); stats at "
          f"http://127.0.0.1:{emulator.port}/emulator/stats; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.close()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
