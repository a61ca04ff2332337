"""A paid teacher API on loopback: the OpenAI chat-completions protocol with a provider's
limits, faults and latency, and the OpenAI and Anthropic batch protocols, for trying a run's
pacing, journal, budget and batch engines without paying.

    python -m reflectune.emulator --port 8100 --rpm 600 --tpm 150000 --latency 0.2

Answers are deterministic: what decides an answer seeds it (the messages, with an Anthropic
`system` as a leading system message, the token limit, temperature, top_p and the JSON schema
asked for; not the model, seed or stream flag), so a request gets the same answer whichever
protocol asks. They come in the form asked: free text with the reflection markers, or a JSON
object for a `response_format` JSON schema or an Anthropic tool that `tool_choice` forces.
Like OpenAI, it refuses vLLM's own request fields (`structured_outputs`) with 400.

Limits are token buckets, as providers keep them: `requests` and `tokens` per `window`
seconds, refilled continuously. Each answer states them in rate-limit headers (OpenAI's
`x-ratelimit-*` or Anthropic's `anthropic-ratelimit-*` names, or none, as `vllm serve`); a
request beyond them gets 429 with Retry-After (and the headers, unless `bare_429`: some gateways
send a 429 of their own without them). Faults: 5xx answers and dropped connections at
set rates. The log counts every distinct request it answered, so a test can tell what was
paid for twice.

Batches run as the providers run them, in `batch_seconds` rather than hours:
- OpenAI: a JSONL file of {custom_id, method, url, body} lines goes up with `POST /v1/files`
  (multipart, purpose "batch"); `POST /v1/batches` starts it; `GET /v1/batches/{id}` moves
  through validating, in_progress and finalizing to completed (expired where a line expired);
  then `GET /v1/files/{id}/content` gives the output file (answered lines) and the error file
  (failed, expired or cancelled lines). `POST /v1/batches/{id}/cancel`, `GET /v1/batches`.
- Anthropic: `POST /v1/messages/batches` with {custom_id, params} requests; its
  `processing_status` goes from in_progress (canceling after a cancel) to ended, and then
  `results_url` gives one JSONL result a request. `POST .../{id}/cancel`, `GET .../batches`.
Each line finishes at a time of its own within the batch; lines expire or fail at set rates.
Batch lines are not rate limited (providers queue them) and are paid for only when answered.
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import email.policy
import hashlib
import json
import math
import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

HEADER_STYLES = ("openai", "anthropic", "none")
# known to OpenAI's API: anything else in a request body is refused, as the real API does
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
                "response_format", "stop", "stream", "user", "frequency_penalty", "presence_penalty", "logprobs"}
# known to Anthropic's Messages API in a batch request's params
ANTHROPIC_FIELDS = {"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "tools",
                    "tool_choice", "stop_sequences", "metadata"}
# the providers' own batch limits: OpenAI's per input file, Anthropic's per batch request
OPENAI_BATCH_REQUESTS, OPENAI_BATCH_BYTES = 50_000, 200 * 2**20
ANTHROPIC_BATCH_REQUESTS, ANTHROPIC_BATCH_BYTES = 100_000, 256 * 2**20
BATCH_ENDPOINT = "/v1/chat/completions"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DAY = 86_400
EXPIRED = "This request could not be executed before the completion window expired."
CANCELLED = "This request was not executed: the batch was cancelled."

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
    answered: Counter = field(default_factory=Counter)  # answer key -> answers paid for, online or in a batch
    statuses: Counter = field(default_factory=Counter)  # online: "200", "429", "500", "drop", "400"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    times: list[tuple[float, int]] = field(default_factory=list)  # when each online 200 was sent, and its tokens
    batches: Counter = field(default_factory=Counter)  # protocol ("openai", "anthropic") -> batches created
    batch_lines: Counter = field(default_factory=Counter)  # answer key -> times submitted in a batch
    batch_expired: int = 0
    batch_failed: int = 0  # a 5xx roll or a body the online path would refuse
    batch_cancelled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"answered": sum(self.answered.values()), "distinct": len(self.answered),
                "duplicates": sum(n - 1 for n in self.answered.values()), "statuses": dict(self.statuses),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "first": self.times[0][0] if self.times else None, "last": self.times[-1][0] if self.times else None,
                "batches": dict(self.batches), "batch_lines": sum(self.batch_lines.values()),
                "batch_lines_distinct": len(self.batch_lines), "batch_lines_expired": self.batch_expired,
                "batch_lines_failed": self.batch_failed, "batch_lines_cancelled": self.batch_cancelled}

    def rate(self, since: float) -> tuple[float, float]:
        """Requests and tokens answered per second from `since` (monotonic) to the last answer."""
        later = [(t, n) for t, n in self.times if t >= since]
        if len(later) < 2:
            return 0.0, 0.0
        span = later[-1][0] - later[0][0]
        return (len(later) - 1) / span, sum(n for _, n in later[1:]) / span


@dataclass
class Reply:
    """An answer in no protocol's form: its key, text, finish reason ("stop" or "length") and tokens."""

    key: str
    text: str
    finish: str
    prompt: int
    completion: int


@dataclass
class _Line:
    """One request of a batch, with what was rolled for it at creation and what became of it."""

    custom_id: str
    body: Any  # the OpenAI body or the Anthropic params, as sent
    canon: dict[str, Any] | None
    key: str
    problem: str | None  # why the online path would refuse the body
    fate: str  # "ok", "error" (a 5xx) or "expire"
    at: float  # seconds after the batch's creation when it finishes
    state: str = "pending"  # then "succeeded", "failed", "expired" or "cancelled"
    result: dict[str, Any] | None = None  # the protocol's result line


@dataclass
class _Batch:
    id: str
    protocol: str  # "openai" or "anthropic"
    lines: list[_Line]
    seconds: float
    started: float  # monotonic
    created: float  # epoch
    info: dict[str, Any] = field(default_factory=dict)  # OpenAI: endpoint, input file, window, metadata, model
    cancel_at: float | None = None  # seconds after creation
    ended: bool = False
    finished: list[_Line] = field(default_factory=list)  # in the order they finished
    output_file_id: str | None = None
    error_file_id: str | None = None

    def end_at(self) -> float:
        """Seconds after creation when the batch ends: its full time, or a tenth of it after a cancel."""
        return self.seconds if self.cancel_at is None else self.cancel_at + 0.1 * self.seconds

    def count(self, state: str) -> int:
        return sum(line.state == state for line in self.lines)


@dataclass
class _File:
    object: dict[str, Any]
    data: bytes
    lines: list[dict[str, Any]] | None = None  # an uploaded batch input, read


Response = tuple[int, str, bytes]  # status, content type, body


class Emulator:
    """The server, in a thread of this process; `url` ends in /v1, `root` is the server's."""

    def __init__(self, *, rpm: int | None = None, tpm: int | None = None, window: float = 60.0,
                 headers: str = "openai", latency: float = 0.05, latency_per_token: float = 0.0,
                 error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, answer_words: tuple[int, int] = (40, 120), echo_errors: str | None = None,
                 batch_seconds: float = 3.0, expire_rate: float = 0.0, batch_error_rate: float = 0.0,
                 max_batch_requests: int | None = None, max_batch_bytes: int | None = None,
                 bare_429: bool = False):
        if headers not in HEADER_STYLES:
            raise ValueError(f"headers '{headers}': choose one of {', '.join(HEADER_STYLES)}")
        self.window = window
        self.requests = Bucket(rpm, window) if rpm else None
        self.tokens = Bucket(tpm, window) if tpm else None
        self.headers, self.latency, self.latency_per_token = headers, latency, latency_per_token
        self.error_rate, self.drop_rate = error_rate, drop_rate
        self.bare_429 = bare_429  # a 429 states no limits, only Retry-After
        self.answer_words = answer_words
        self.echo_errors = echo_errors  # a 400 body that echoes the request's Authorization header
        self.batch_seconds, self.expire_rate, self.batch_error_rate = batch_seconds, expire_rate, batch_error_rate
        self.max_batch_requests, self.max_batch_bytes = max_batch_requests, max_batch_bytes
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.stats = Stats()
        self.keys_seen: set[str] = set()  # the API keys requests carried (Bearer or x-api-key)
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}  # in the order created
        self._server = _Server((host, port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="emulator", daemon=True)
        self._thread.start()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def reset_stats(self) -> None:
        """A fresh log. The batches stay; their lines finished by now are counted in the old log."""
        with self._lock:
            self._settle_all()
            self.stats = Stats()

    def saw(self, headers: Any) -> None:
        """Note the API key a request carried."""
        key = headers.get("x-api-key") or (headers.get("authorization") or "").removeprefix("Bearer ")
        if key:
            with self._lock:
                self.keys_seen.add(key)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._settle_all()
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
        problem = openai_problem(body)
        if problem:
            with self._lock:
                self.stats.statuses["400"] += 1
            return 400, {}, _error(problem, "invalid_request_error")
        reply = self.reply(canonical(body))
        with self._lock:
            now = time.monotonic()
            for bucket in (self.requests, self.tokens):
                if bucket:
                    bucket.refill(now)
            wait = max(self.requests.wait(1) if self.requests else 0.0,
                       self.tokens.wait(reply.prompt + reply.completion) if self.tokens else 0.0)
            if wait > 0:
                self.stats.statuses["429"] += 1
                headers = ({} if self.bare_429 else self._limit_headers()) | {"retry-after": str(max(1, math.ceil(wait))),
                                                   "retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
                return 429, headers, _error("Rate limit reached: retry after the time in Retry-After", "rate_limit")
            if self.requests:
                self.requests.level -= 1
            if self.tokens:
                self.tokens.level -= reply.prompt + reply.completion
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
        time.sleep(self.latency + self.latency_per_token * reply.completion)
        with self._lock:
            self.stats.statuses["200"] += 1
            self._pay(reply)
            self.stats.times.append((time.monotonic(), reply.prompt + reply.completion))
        return 200, headers, chat_completion(body, reply)

    def reply(self, canon: dict[str, Any]) -> Reply:
        """The answer to a request in its canonical form (see `canonical`)."""
        key = answer_key(canon)
        text, finish = self._completion(canon, key)
        prompt = sum(count_tokens(m["content"]) + 4 for m in canon["messages"])
        return Reply(key, text, finish, prompt, count_tokens(text))

    def _pay(self, reply: Reply) -> None:
        """Count an answer as paid for (under the lock)."""
        self.stats.answered[reply.key] += 1
        self.stats.prompt_tokens += reply.prompt
        self.stats.completion_tokens += reply.completion

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

    def _completion(self, canon: dict[str, Any], key: str) -> tuple[str, str]:
        """The answer to a canonical request, in the form it asks for, and its finish reason."""
        rng = random.Random(key)
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        schema = canon["schema"]
        system = " ".join(m["content"] for m in canon["messages"])
        lo, hi = self.answer_words
        if isinstance(schema, dict):
            obj: dict[str, Any] = {}
            for name, spec in (schema.get("properties") or {}).items():
                if spec.get("enum"):
                    obj[name] = rng.choice(spec["enum"])
                elif spec.get("type") == "integer":
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
        elif system.rstrip().endswith("Answer with one word: Yes or No."):  # a verification
            text = rng.choice(("Yes", "No"))
        else:
            text = words(lo, hi).capitalize() + "."
        limit = canon["max_tokens"]
        if limit and count_tokens(text) > limit:
            return text[: 4 * int(limit)], "length"
        return text, "stop"

    # -- batches ------------------------------------------------------------------------------

    def batch_route(self, method: str, target: str, headers: email.message.Message, raw: bytes) -> Response | None:
        """The batch protocols' answer to a request, or None for a path that is not theirs."""
        url = urlsplit(target)
        parts, query = url.path.rstrip("/").split("/")[1:], dict(parse_qsl(url.query))
        root = f"http://{headers.get('host') or f'127.0.0.1:{self.port}'}"
        match method, parts:  # the bodies that may be large are read before the lock is taken
            case "POST", ["v1", "files"]:
                return self._upload(headers.get("content-type", ""), raw)
            case "POST", ["v1", "messages", "batches"]:
                return self._anthropic_create(raw, root)
        with self._lock:
            match method, parts:
                case "GET", ["v1", "files", file_id]:
                    file = self._files.get(file_id)
                    return _json(200, file.object) if file else _no_file(file_id)
                case "GET", ["v1", "files", file_id, "content"]:
                    file = self._files.get(file_id)
                    return (200, "application/octet-stream", file.data) if file else _no_file(file_id)
                case "POST", ["v1", "batches"]:
                    return self._openai_create(raw)
                case "GET", ["v1", "batches"]:
                    return _json(200, self._page("openai", query, root))
                case "GET", ["v1", "batches", batch_id]:
                    batch = self._batch(batch_id, "openai")
                    return _json(200, self._openai_object(batch)) if batch else _no_batch(batch_id, "openai")
                case "POST", ["v1", "batches", batch_id, "cancel"]:
                    return self._cancel(batch_id, "openai", root)
                case "GET", ["v1", "messages", "batches"]:
                    return _json(200, self._page("anthropic", query, root))
                case "GET", ["v1", "messages", "batches", batch_id]:
                    batch = self._batch(batch_id, "anthropic")
                    return (_json(200, self._anthropic_object(batch, root)) if batch
                            else _no_batch(batch_id, "anthropic"))
                case "GET", ["v1", "messages", "batches", batch_id, "results"]:
                    return self._anthropic_results(batch_id)
                case "POST", ["v1", "messages", "batches", batch_id, "cancel"]:
                    return self._cancel(batch_id, "anthropic", root)
        return None

    def _upload(self, content_type: str, raw: bytes) -> Response:
        """`POST /v1/files`: a batch input file, refused as OpenAI refuses one it cannot run."""
        fields = _multipart(content_type, raw)
        if fields is None or "file" not in fields:
            return _json(400, _error("a multipart/form-data body with a 'file' field is required",
                                     "invalid_request_error"))
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace").strip()
        if purpose != "batch":
            return _json(400, _error(f"purpose '{purpose}': the emulator takes 'batch' files only",
                                     "invalid_request_error"))
        name, data = fields["file"]
        limit = self.max_batch_bytes or OPENAI_BATCH_BYTES
        if len(data) > limit:
            return _json(400, _error(f"File is {len(data):,} bytes, over the batch limit of {limit:,} bytes",
                                     "invalid_request_error"))
        lines, problem = self._read_jsonl(data)
        if problem:
            return _json(400, _error(problem, "invalid_request_error"))
        with self._lock:
            file = self._new_file(name or "batch.jsonl", data, "batch")
        file.lines = lines
        return _json(200, file.object)

    def _read_jsonl(self, data: bytes) -> tuple[list[dict[str, Any]], str | None]:
        """An input file's request lines, or why OpenAI would refuse the file."""
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, text in enumerate(data.splitlines(), 1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except ValueError:
                return [], f"Line {number} is not valid JSON"
            missing = [k for k in ("custom_id", "method", "url", "body") if not isinstance(item, dict) or k not in item]
            if missing:
                return [], f"Line {number} lacks {', '.join(missing)}"
            if not isinstance(item["custom_id"], str):
                return [], f"Line {number}: custom_id must be a string"
            if item["custom_id"] in seen:
                return [], f"Line {number}: custom_id '{item['custom_id']}' is not unique in the file"
            seen.add(item["custom_id"])
            lines.append(item)
        limit = self.max_batch_requests or OPENAI_BATCH_REQUESTS
        if len(lines) > limit:
            return [], f"The file has {len(lines):,} requests, over the batch limit of {limit:,}"
        return lines, None if lines else "The file has no requests"

    def _new_file(self, name: str, data: bytes, purpose: str) -> _File:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        file = _File({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                      "filename": name, "purpose": purpose, "status": "processed", "status_details": None}, data)
        self._files[file_id] = file
        return file

    def _openai_create(self, raw: bytes) -> Response:
        """`POST /v1/batches`: a batch of an uploaded file's lines, each rolled its fate and time."""
        body = _json_body(raw)
        if not isinstance(body, dict):
            return _json(400, _error("the body is not a JSON object", "invalid_request_error"))
        file = self._files.get(body.get("input_file_id"))
        if file is None:
            return _no_file(str(body.get("input_file_id")))
        if file.lines is None:
            return _json(400, _error(f"File {file.object['id']} is not a batch input file", "invalid_request_error"))
        if body.get("endpoint") != BATCH_ENDPOINT:
            return _json(400, _error(f"endpoint '{body.get('endpoint')}': the emulator runs {BATCH_ENDPOINT} only",
                                     "invalid_request_error"))
        if body.get("completion_window") != "24h":
            return _json(400, _error("completion_window must be '24h'", "invalid_request_error"))
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            return _json(400, _error("metadata must be an object", "invalid_request_error"))
        for number, item in enumerate(file.lines, 1):
            if item["method"] != "POST" or item["url"] != BATCH_ENDPOINT:
                return _json(400, _error(f"Line {number}: {item['method']} {item['url']} is not POST "
                                         f"{BATCH_ENDPOINT}, the batch's endpoint", "invalid_request_error"))
        model = next((i["body"].get("model") for i in file.lines if isinstance(i["body"], dict)), None)
        batch = self._new_batch("openai", [(i["custom_id"], i["body"]) for i in file.lines],
                                {"endpoint": BATCH_ENDPOINT, "input_file_id": file.object["id"],
                                 "completion_window": "24h", "metadata": body.get("metadata"), "model": model})
        return _json(200, self._openai_object(batch))

    def _anthropic_create(self, raw: bytes, root: str) -> Response:
        """`POST /v1/messages/batches`: refused whole for a malformed request list, as Anthropic does;
        a request's params are checked when it runs."""
        limit = self.max_batch_bytes or ANTHROPIC_BATCH_BYTES
        if len(raw) > limit:
            return _json(413, _anthropic_error(f"Request is {len(raw):,} bytes, over the batch limit of {limit:,}",
                                               "request_too_large"))
        body = _json_body(raw)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _json(400, _anthropic_error("requests: a non-empty list is required"))
        count = self.max_batch_requests or ANTHROPIC_BATCH_REQUESTS
        if len(requests) > count:
            return _json(400, _anthropic_error(f"requests: {len(requests):,} given, the limit is {count:,}"))
        seen: set[str] = set()
        for number, request in enumerate(requests):
            custom_id = request.get("custom_id") if isinstance(request, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
                return _json(400, _anthropic_error(f"requests.{number}.custom_id: {custom_id!r} does not match "
                                                   f"{CUSTOM_ID.pattern}"))
            if custom_id in seen:
                return _json(400, _anthropic_error(f"requests.{number}.custom_id: '{custom_id}' is used twice; "
                                                   "custom_id must be unique within a batch"))
            if "params" not in request:
                return _json(400, _anthropic_error(f"requests.{number}.params: Field required"))
            seen.add(custom_id)
        with self._lock:
            batch = self._new_batch("anthropic", [(r["custom_id"], r["params"]) for r in requests], {})
            return _json(200, self._anthropic_object(batch, root))

    def _new_batch(self, protocol: str, requests: list[tuple[str, Any]], info: dict[str, Any]) -> _Batch:
        prefix = "batch_" if protocol == "openai" else "msgbatch_"
        lines = [self._line(custom_id, body, protocol) for custom_id, body in requests]
        batch = _Batch(f"{prefix}{uuid.uuid4().hex}", protocol, lines, self.batch_seconds, time.monotonic(),
                       time.time(), info)
        self._batches[batch.id] = batch
        self.stats.batches[protocol] += 1
        for line in lines:
            self.stats.batch_lines[line.key] += 1
        return batch

    def _line(self, custom_id: str, body: Any, protocol: str) -> _Line:
        """A batch line, its fate (answered, failed or expired) and finish time rolled from the seed."""
        problem = (openai_problem if protocol == "openai" else anthropic_problem)(body)
        try:
            canon: dict[str, Any] | None = canonical(body, protocol)
        except (ValueError, AttributeError, TypeError):
            canon = None
        key = answer_key(canon) if canon else request_key(body if isinstance(body, dict) else {"body": body})
        roll, at = self._random.random(), self._random.uniform(0.1, 0.9) * self.batch_seconds
        fate = ("expire" if roll < self.expire_rate
                else "error" if roll < self.expire_rate + self.batch_error_rate else "ok")
        return _Line(custom_id, body, None if problem else canon, key, problem, fate, at)

    def _batch(self, batch_id: str, protocol: str) -> _Batch | None:
        """A batch of a protocol, brought up to now."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.protocol != protocol:
            return None
        self._settle(batch, time.monotonic())
        return batch

    def _settle_all(self) -> None:
        now = time.monotonic()
        for batch in self._batches.values():
            self._settle(batch, now)

    def _settle(self, batch: _Batch, now: float) -> None:
        """Finish the lines whose time has come and end the batch when its time has come, paying for
        each answered line as it finishes (under the lock)."""
        if batch.ended:
            return
        elapsed = now - batch.started
        cut = elapsed if batch.cancel_at is None else min(elapsed, batch.cancel_at)
        due = [line for line in batch.lines if line.state == "pending" and line.fate != "expire" and line.at <= cut]
        for line in sorted(due, key=lambda line: line.at):
            self._finish(batch, line)
        if elapsed < batch.end_at():
            return
        for line in batch.lines:
            if line.state == "pending":
                line.state = "cancelled" if batch.cancel_at is not None else "expired"
                if line.state == "cancelled":
                    self.stats.batch_cancelled += 1
                else:
                    self.stats.batch_expired += 1
                line.result = _openai_unrun(line) if batch.protocol == "openai" else _anthropic_unrun(line)
        batch.ended = True
        if batch.protocol == "openai":
            unrun = [line for line in batch.lines if line.state in ("expired", "cancelled")]
            done = [line for line in batch.finished if line.state == "succeeded"]
            failed = [line for line in batch.finished if line.state == "failed"] + unrun
            for lines, kind in ((done, "output"), (failed, "error")):
                if lines:
                    data = "".join(json.dumps(line.result) + "\n" for line in lines).encode()
                    file = self._new_file(f"{batch.id}_{kind}.jsonl", data, "batch_output")
                    setattr(batch, f"{kind}_file_id", file.object["id"])

    def _finish(self, batch: _Batch, line: _Line) -> None:
        """A line's answer, failure or refusal, in its protocol's form."""
        openai = batch.protocol == "openai"
        if line.problem or line.fate == "error" or line.canon is None:
            line.state = "failed"
            self.stats.batch_failed += 1
            if line.problem:
                status, message, kind = 400, line.problem, "invalid_request_error"
            else:
                status, message = 500, "The server had an error while processing your request"
                kind = "server_error" if openai else "api_error"
            if openai:
                line.result = _openai_line(line, status, _error(message, kind))
            else:
                line.result = {"custom_id": line.custom_id, "result": {"type": "errored",
                                                                       "error": _anthropic_error(message, kind)}}
        else:
            reply = self.reply(line.canon)
            line.state = "succeeded"
            self._pay(reply)
            if openai:
                line.result = _openai_line(line, 200, chat_completion(line.body, reply))
            else:
                line.result = {"custom_id": line.custom_id,
                               "result": {"type": "succeeded", "message": anthropic_message(line.body, reply)}}
        batch.finished.append(line)

    def _openai_object(self, batch: _Batch) -> dict[str, Any]:
        """The batch object OpenAI answers, at this moment of the batch's life."""
        elapsed, seconds = time.monotonic() - batch.started, batch.seconds
        cancelled = batch.cancel_at is not None
        if cancelled:
            status = "cancelled" if batch.ended else "cancelling"
        elif batch.ended:
            status = "expired" if batch.count("expired") else "completed"
        else:
            status = ("validating" if elapsed < 0.1 * seconds
                      else "in_progress" if elapsed < 0.9 * seconds else "finalizing")
        at = lambda offset: int(batch.created + offset)
        started = elapsed >= 0.1 * seconds and (not cancelled or batch.cancel_at >= 0.1 * seconds)
        finalized = status in ("finalizing", "completed", "expired")
        ended_at = at(batch.end_at()) if batch.ended else None
        return {"id": batch.id, "object": "batch", "endpoint": batch.info["endpoint"], "errors": None,
                "input_file_id": batch.info["input_file_id"], "completion_window": batch.info["completion_window"],
                "status": status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                "created_at": at(0), "in_progress_at": at(0.1 * seconds) if started else None,
                "expires_at": at(DAY), "finalizing_at": at(0.9 * seconds) if finalized else None,
                "completed_at": ended_at if status == "completed" else None, "failed_at": None,
                "expired_at": ended_at if status == "expired" else None,
                "cancelling_at": at(batch.cancel_at) if cancelled else None,
                "cancelled_at": ended_at if status == "cancelled" else None,
                "request_counts": {"total": len(batch.lines), "completed": batch.count("succeeded"),
                                   "failed": batch.count("failed")},
                "metadata": batch.info["metadata"], "model": batch.info["model"]}

    def _anthropic_object(self, batch: _Batch, root: str) -> dict[str, Any]:
        """The message batch object Anthropic answers, at this moment of the batch's life."""
        status = "ended" if batch.ended else "canceling" if batch.cancel_at is not None else "in_progress"
        return {"id": batch.id, "type": "message_batch", "processing_status": status,
                "request_counts": {"processing": batch.count("pending"), "succeeded": batch.count("succeeded"),
                                   "errored": batch.count("failed"), "canceled": batch.count("cancelled"),
                                   "expired": batch.count("expired")},
                "ended_at": _rfc3339(batch.created + batch.end_at()) if batch.ended else None,
                "created_at": _rfc3339(batch.created), "expires_at": _rfc3339(batch.created + DAY),
                "archived_at": None,
                "cancel_initiated_at": (_rfc3339(batch.created + batch.cancel_at) if batch.cancel_at is not None
                                        else None),
                "results_url": f"{root}/v1/messages/batches/{batch.id}/results" if batch.ended else None}

    def _anthropic_results(self, batch_id: str) -> Response:
        batch = self._batch(batch_id, "anthropic")
        if batch is None:
            return _no_batch(batch_id, "anthropic")
        if not batch.ended:
            return _json(404, _anthropic_error(f"Results of batch {batch_id} are not available until it has "
                                               "ended", "not_found_error"))
        ordered = batch.finished + [line for line in batch.lines if line.state in ("expired", "cancelled")]
        return 200, "application/binary", "".join(json.dumps(line.result) + "\n" for line in ordered).encode()

    def _cancel(self, batch_id: str, protocol: str, root: str) -> Response:
        """Stop a running batch: what finished stays, the rest is cancelled a tenth of its time later."""
        batch = self._batch(batch_id, protocol)
        if batch is None:
            return _no_batch(batch_id, protocol)
        if batch.ended:
            if protocol == "openai":
                return _json(409, _error(f"Cannot cancel a batch with status '{self._openai_object(batch)['status']}'",
                                         "invalid_request_error"))
            return _json(400, _anthropic_error(f"Batch {batch_id} has ended and cannot be canceled"))
        if batch.cancel_at is None:
            batch.cancel_at = time.monotonic() - batch.started
        return _json(200, self._openai_object(batch) if protocol == "openai" else self._anthropic_object(batch, root))

    def _page(self, protocol: str, query: dict[str, str], root: str) -> dict[str, Any]:
        """A page of a protocol's batches, newest first, after (or, for Anthropic, before) a cursor."""
        batches = [b for b in reversed(self._batches.values()) if b.protocol == protocol]
        ids = [b.id for b in batches]
        try:
            limit = max(1, min(100 if protocol == "openai" else 1000, int(query.get("limit", 20))))
        except ValueError:
            limit = 20
        after = query.get("after" if protocol == "openai" else "after_id")
        before = query.get("before_id") if protocol == "anthropic" else None
        if before in ids:
            rest = batches[:ids.index(before)]
            page = rest[-limit:]
        else:
            rest = batches[ids.index(after) + 1:] if after in ids else batches
            page = rest[:limit]
        now = time.monotonic()
        for batch in page:
            self._settle(batch, now)
        data = [self._openai_object(b) if protocol == "openai" else self._anthropic_object(b, root) for b in page]
        out = {"data": data, "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
               "has_more": len(rest) > len(page)}
        return {"object": "list"} | out if protocol == "openai" else out


def canonical(body: dict[str, Any], protocol: str = "openai") -> dict[str, Any]:
    """What decides an answer, the same whichever protocol asks: the messages as {role, content}
    strings (an Anthropic `system` first, as a system message; text blocks joined), the token
    limit, temperature and top_p (1.0 when absent) and the JSON schema asked for (an OpenAI
    `response_format` schema or the input schema of the Anthropic tool that `tool_choice`
    forces), or None. The model, seed and stream flag do not decide it. ValueError for a body
    that cannot be read."""
    if not isinstance(body.get("messages"), list):
        raise ValueError("messages missing")
    turns = list(body["messages"])
    if protocol == "anthropic" and body.get("system"):
        turns.insert(0, {"role": "system", "content": body["system"]})
    if not all(isinstance(turn, dict) for turn in turns):
        raise ValueError("each message must be an object with a role and content")
    messages = [{"role": str(turn.get("role", "")), "content": _text(turn.get("content"))} for turn in turns]
    schema = None
    if protocol == "anthropic":
        limit = body.get("max_tokens")
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "tool":
            tools = {t.get("name"): t for t in body.get("tools") or [] if isinstance(t, dict)}
            if choice.get("name") not in tools:
                raise ValueError(f"tool_choice forces tool '{choice.get('name')}', which is not in tools")
            schema = tools[choice["name"]].get("input_schema")
    else:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        fmt = body.get("response_format") or {}
        if not isinstance(fmt, dict):
            raise ValueError("response_format must be an object")
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
    return {"messages": messages, "max_tokens": _number(limit, int, None), "temperature": _number(
        body.get("temperature"), float, 1.0), "top_p": _number(body.get("top_p"), float, 1.0), "schema": schema}


def answer_key(canon: dict[str, Any]) -> str:
    """What makes two requests the same request, in any protocol: a hash of the canonical form."""
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def request_key(body: dict[str, Any]) -> str:
    """A hash of a whole body but the stream flag: the key of a batch line that cannot be read."""
    shown = {k: v for k, v in body.items() if k != "stream"}
    return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()


def openai_problem(body: Any) -> str | None:
    """Why OpenAI's chat-completions endpoint would refuse a body, or None."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        return f"Unrecognized request argument supplied: {', '.join(unknown)}"
    return _unreadable(body, "openai")


def anthropic_problem(params: Any) -> str | None:
    """Why Anthropic's Messages API would refuse a batch request's params, or None."""
    if not isinstance(params, dict):
        return "params: Input should be an object"
    unknown = sorted(set(params) - ANTHROPIC_FIELDS)
    if unknown:
        return f"{unknown[0]}: Extra inputs are not permitted"
    missing = [name for name in ("model", "max_tokens", "messages") if name not in params]
    if missing:
        return f"{missing[0]}: Field required"
    return _unreadable(params, "anthropic")


def _unreadable(body: dict[str, Any], protocol: str) -> str | None:
    try:
        canonical(body, protocol)
    except (ValueError, AttributeError, TypeError) as e:
        return str(e)
    return None


def chat_completion(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The chat.completion object OpenAI answers, online or in a batch's output line."""
    return {
        "id": f"chatcmpl-{reply.key[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish}],
        "usage": {"prompt_tokens": reply.prompt, "completion_tokens": reply.completion,
                  "total_tokens": reply.prompt + reply.completion},
    }


def anthropic_message(params: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The Message Anthropic answers: the text, or a forced tool's call when the JSON answer is whole."""
    choice = params.get("tool_choice")
    forced = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None
    if forced and reply.finish == "stop":
        content = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": forced,
                    "input": json.loads(reply.text)}]
        stop = "tool_use"
    else:
        content = [{"type": "text", "text": reply.text}]
        stop = "end_turn" if reply.finish == "stop" else "max_tokens"
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": params.get("model", ""), "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt, "output_tokens": reply.completion}}


def _openai_line(line: _Line, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def _openai_unrun(line: _Line) -> dict[str, Any]:
    """An error-file line of a request the batch did not run: expired, or cancelled."""
    code, message = ("batch_expired", EXPIRED) if line.state == "expired" else ("batch_cancelled", CANCELLED)
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _anthropic_unrun(line: _Line) -> dict[str, Any]:
    """The result of a request the batch did not run: expired, or canceled (Anthropic's spelling)."""
    return {"custom_id": line.custom_id, "result": {"type": "expired" if line.state == "expired" else "canceled"}}


def _text(content: Any) -> str:
    """A message's content as one string: a string, or the text of its blocks joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    raise ValueError("a message's content must be a string or a list of content blocks")


def _number(value: Any, kind: type, default: Any) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return kind(value)


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """The fields of a multipart/form-data body (name -> (file name or None, bytes)), or None."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return None
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = (headers.get_filename(), content.removesuffix(b"\r\n"))
    return fields


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 6m0s, 1.5s, 20ms."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def _anthropic_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _json(status: int, obj: Any) -> Response:
    return status, "application/json", json.dumps(obj).encode()


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return None


def _no_file(file_id: str) -> Response:
    return _json(404, _error(f"No such File object: {file_id}", "invalid_request_error"))


def _no_batch(batch_id: str, protocol: str) -> Response:
    if protocol == "openai":
        return _json(404, _error(f"No batch found with id '{batch_id}'.", "invalid_request_error"))
    return _json(404, _anthropic_error(f"No message batch with id '{batch_id}'", "not_found_error"))


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
            emulator.saw(self.headers)
            batch = emulator.batch_route("GET", self.path, self.headers, b"")
            if batch is not None:
                self._send_bytes(*batch)
            elif self.path.rstrip("/").endswith("/models"):
                self._send(200, {}, {"object": "list", "data": [{"id": "emulated", "object": "model"}]})
            elif self.path.startswith("/emulator/stats"):
                self._send(200, {}, emulator.snapshot())
            elif self.path in ("/health", "/"):
                self._send(200, {}, {"status": "ok"})
            else:
                self._send(404, {}, _error(f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            emulator.saw(self.headers)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.startswith("/emulator/reset"):
                emulator.reset_stats()
                return self._send(200, {}, {"reset": True})
            batch = emulator.batch_route("POST", self.path, self.headers, raw)
            if batch is not None:
                return self._send_bytes(*batch)
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
            self._send_bytes(status, "application/json", json.dumps(obj).encode(), headers)

        def _send_bytes(self, status: int, content_type: str, data: bytes,
                        headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main(argv: list[str] | None = None, prog: str = "python -m reflectune.emulator") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--rpm", type=int, help="requests per window (default: unlimited)")
    parser.add_argument("--tpm", type=int, help="tokens (prompt + completion) per window (default: unlimited)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the limits are stated for")
    parser.add_argument("--headers", choices=HEADER_STYLES, default="openai", help="rate-limit header names")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    parser.add_argument("--latency-per-token", type=float, default=0.0, help="added seconds per completion token")
    parser.add_argument("--bare-429", action="store_true", help="answer 429 with Retry-After only, no rate-limit "
                        "headers (the 200s keep them)")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500 or 503")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped unanswered")
    parser.add_argument("--batch-seconds", type=float, default=3.0, help="seconds a batch takes from creation to end")
    parser.add_argument("--expire-rate", type=float, default=0.0, help="share of batch lines that expire unrun")
    parser.add_argument("--batch-error-rate", type=float, default=0.0, help="share of batch lines that fail (5xx)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    emulator = Emulator(rpm=args.rpm, tpm=args.tpm, window=args.window, headers=args.headers, latency=args.latency,
                        latency_per_token=args.latency_per_token, error_rate=args.error_rate,
                        drop_rate=args.drop_rate, seed=args.seed, port=args.port, batch_seconds=args.batch_seconds,
                        expire_rate=args.expire_rate, batch_error_rate=args.batch_error_rate,
                        bare_429=args.bare_429)
    print(f"emulated teacher API at {emulator.url} (model name: any; Anthropic SDKs: {emulator.root}); stats at "
          f"{emulator.root}/emulator/stats; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.close()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
