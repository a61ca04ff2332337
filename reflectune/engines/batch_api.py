"""Teacher engines through providers' batch APIs, at about half the online price, answering
within 24 hours: `openai-batch` (OpenAI's Files and Batches API, `/v1/chat/completions`
lines) and `anthropic-batch` (Anthropic's Message Batches, through the `anthropic` SDK).

One `generate` call (one phase of a shard's reflection: ins and res; ins_res; the retry of
unusable rows) becomes one batch, or several where the provider's limits on requests per
batch and bytes per file require. Each request's `custom_id` is its request-journal key, and
results are matched by it, never by line order.

Nothing is paid for twice. A batch is written to the ledger (`Ledger`, kept by the request
journal on the run's storage) before it is created and again with its id the moment it is
created, so a retried task, a rerun or another worker re-attaches to the batches in flight
for its requests instead of submitting them again (an OpenAI batch created but not yet
recorded is found again by its ledger tag in the batch's metadata). Finished lines go to the
request journal as they are collected; expired, cancelled and server-failed lines are
submitted again alone, up to `max_resubmits` times; a line the provider refuses (4xx) fails
that request only, as online.

Waiting loads no model: the engine polls at a growing interval (`poll_seconds`, times 1.5 up
to `poll_max_seconds`) and reports lines done and failed per batch as a progress note. The
user's Ctrl-C leaves batches in flight; the next run picks them up from the ledger.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from reflectune import progress as progress_hook
from reflectune import secrets
from reflectune.engines.openai_compat import TeacherFatalError, TeacherUnavailableError, endpoint, identity, teacher_id

# the providers' published limits: requests per batch and bytes per input file (OpenAI) or
# per batch creation request (Anthropic)
LIMITS = {"openai-batch": (50_000, 200 * 1024 * 1024), "anthropic-batch": (100_000, 256 * 1024 * 1024)}
KEY_ENVS = {"openai-batch": "OPENAI_API_KEY", "anthropic-batch": "ANTHROPIC_API_KEY"}
# what a call's tally counts: batches created, lines submitted, lines submitted again, batches
# of an earlier attempt waited for
TALLY = ("batches_created", "batch_lines", "batch_lines_resubmitted", "batches_reattached")
# where a line may be sent again: it was never answered (expired, cancelled) or the server failed it
RESEND = "resend"


def batch_teacher_id(provider: str, model: str, base_url: str | None) -> str:
    """The teacher as records name it: the model and the host, as the online engine of the
    same provider has it (an answer is the model's, whichever way it was asked for)."""
    if provider == "openai-batch":
        return teacher_id(model, base_url)
    host = urlsplit(base_url).netloc.rpartition("@")[2] if base_url else "api.anthropic.com"
    return f"anthropic:{model}@{host}"


def batch_identity(provider: str, model: str, base_url: str | None) -> str:
    """Who answers, as request keys know it (openai_compat.identity): an OpenAI batch's answers
    are the online engine's, so a journal serves both."""
    if provider == "openai-batch":
        return identity("openai", model, base_url, "api.openai.com")
    return identity("anthropic", model, base_url, "api.anthropic.com")


class Ledger(Protocol):
    """Where batches are kept the moment they are created (reflectune.journal.BatchLedger)."""

    def find(self, keys: set[str]) -> list[dict[str, Any]]: ...

    def record(self, entry: dict[str, Any]) -> None: ...


class MemoryLedger:
    """A ledger that lasts as long as the engine: for callers without a journal."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def find(self, keys: set[str]) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries.values() if keys.intersection(e["keys"])]

    def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["tag"]] = dict(entry)


@dataclass
class Outcome:
    """One line of a finished batch: its generation, or why it has none."""

    gen: Any = None  # reflection.Generation
    error: str | None = None  # RESEND, or the provider's refusal of this request


@dataclass
class _Batch:
    entry: dict[str, Any]
    keys: list[str]  # the requests this call waits for from it
    done: int = 0
    failed: int = 0
    total: int = 0
    status: str = "submitted"
    reported: int = 0  # lines done already counted in progress


class BatchTeacher:
    """A teacher engine (reflection.TeacherEngine) through a provider's batch API."""

    submits_batches = True  # the journal hands it the request keys and the ledger
    thread_safe = True  # calls share nothing but the client: shards may wait on it at once

    def __init__(self, model: str, provider: str = "openai-batch", base_url: str | None = None,
                 api_key: str | None = None, api_key_env: str | None = None, poll_seconds: float = 30.0,
                 poll_max_seconds: float = 600.0, max_requests: int | None = None, max_bytes: int | None = None,
                 max_resubmits: int = 3, timeout: float = 300.0):
        if provider not in LIMITS:
            raise ValueError(f"unknown batch provider '{provider}': choose one of {', '.join(LIMITS)}")
        self.model, self.provider, self.base_url = model, provider, base_url
        self._api_key = api_key or os.environ.get(api_key_env or KEY_ENVS[provider]) or "no-key"
        secrets.register(self._api_key)
        self.poll_seconds, self.poll_max_seconds = poll_seconds, max(poll_seconds, poll_max_seconds)
        self.max_requests = max_requests or LIMITS[provider][0]
        self.max_bytes = max_bytes or LIMITS[provider][1]
        self.max_resubmits = max_resubmits
        self.teacher_id = batch_teacher_id(provider, model, base_url)
        self.identity = batch_identity(provider, model, base_url)
        api = _OpenAIBatches if provider == "openai-batch" else _AnthropicBatches
        self._api = api(model, base_url, self._api_key, timeout)
        self._memory = MemoryLedger()

    def __repr__(self) -> str:  # never show the key
        return f"BatchTeacher(provider={self.provider!r}, model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, chats: Sequence[list[dict[str, str]]], sampling: Any,
                 progress: Callable[..., None] | None = None, formats: Sequence[Any] | None = None, *,
                 admit: Callable[[int], bool] | None = None, done: Callable[[int, Any], None] | None = None,
                 keys: Sequence[str] | None = None, ledger: Ledger | None = None,
                 tally: Counter | None = None) -> list[Any]:
        """One generation per chat, through batches. `keys` (the journal's request keys) are
        the lines' custom ids; `ledger` keeps the batches (by default, this engine's memory);
        `tally` counts this call's batches, lines, lines resubmitted and batches re-attached."""
        from reflectune.reflection import NOT_SENT, Generation, request_key

        n = len(chats)
        if sampling.constrained == "off" or formats is None:
            formats = [None] * n
        keys = list(keys) if keys is not None else [request_key(self.identity, c, sampling, f)
                                                    for c, f in zip(chats, formats)]
        ledger = ledger or self._memory
        tally = tally if tally is not None else Counter()
        index = {k: i for i, k in enumerate(keys)}
        out: list[Any] = [None] * n
        tries = dict.fromkeys(keys, 0)

        def settle(key: str, outcome: Outcome) -> bool:
            """Keep a line's outcome; False where it is to be sent again."""
            i = index[key]
            if outcome.error == RESEND:
                if tries[key] <= self.max_resubmits:
                    return False
                outcome = Outcome(error=f"not answered in {tries[key]} batches (expired, cancelled or failed)")
            gen = outcome.gen if outcome.gen is not None else Generation(error=outcome.error)
            out[i] = gen
            if done and gen.error is None:
                done(i, gen)
            return True

        waiting = self._reattach(ledger, keys)
        tally["batches_reattached"] += len(waiting)
        taken = {k for b in waiting for k in b.keys}
        fresh = [k for k in keys if k not in taken]
        admitted = []
        for k in fresh:
            if admit is not None and not admit(index[k]):
                break
            admitted.append(k)
        for k in fresh[len(admitted):]:
            out[index[k]] = Generation(error=NOT_SENT)
        waiting += self._submit(ledger, admitted, chats, sampling, formats, index, tries, tally)

        interval = self.poll_seconds
        while waiting:
            still, resend = [], []
            for batch in waiting:
                finished = self._api.status(batch)
                self._report(batch, progress)
                if not finished:
                    still.append(batch)
                    continue
                outcomes = self._api.results(batch)
                tokens = 0
                for key in batch.keys:
                    outcome = outcomes.get(key, Outcome(error=RESEND))  # a line missing from the results was not answered
                    if outcome.gen is not None and formats[index[key]] is not None and self._api.way:
                        outcome.gen.constrained = answered_in(self._api.way, outcome.gen.text, formats[index[key]])
                    if outcome.gen is not None:
                        tokens += outcome.gen.completion_tokens
                    if not settle(key, outcome):
                        resend.append(key)
                if progress:
                    answered = sum(1 for k in batch.keys if out[index[k]] is not None and out[index[k]].error is None)
                    progress(max(0, answered - batch.reported), tokens, note=self._note(waiting))
                    batch.reported = answered
            if resend:
                tally["batch_lines_resubmitted"] += len(resend)
                still += self._submit(ledger, resend, chats, sampling, formats, index, tries, tally)
            waiting = still
            if waiting:
                _sleep(interval)
                interval = min(interval * 1.5, self.poll_max_seconds)
        return out

    # -- batches ---------------------------------------------------------------------------

    def _reattach(self, ledger: Ledger, keys: list[str]) -> list[_Batch]:
        """The batches in the ledger that hold these requests, the newest for each request."""
        wanted = set(keys)
        newest: dict[str, dict[str, Any]] = {}
        for entry in sorted(ledger.find(wanted), key=lambda e: e["created"]):
            if entry.get("provider") != self.provider:
                continue
            if entry.get("id") is None:  # killed between creating it and recording its id
                entry = self._api.recover(entry)
                if entry is None:
                    continue
                ledger.record(entry)
            for k in wanted.intersection(entry["keys"]):
                newest[k] = entry
        by_tag: dict[str, _Batch] = {}
        for k in keys:
            if k in newest:
                entry = newest[k]
                by_tag.setdefault(entry["tag"], _Batch(entry, [])).keys.append(k)
        return list(by_tag.values())

    def _submit(self, ledger: Ledger, keys: list[str], chats, sampling, formats, index, tries,
                tally: Counter) -> list[_Batch]:
        """New batches for `keys`, split by the provider's limits, each in the ledger before and
        after it is created."""
        lines = [(k, self._api.line(k, chats[index[k]], sampling, formats[index[k]])) for k in keys]
        batches = []
        for group in _split(lines, self.max_requests, self.max_bytes, self._api.overhead):
            progress_hook.check()  # the user's Ctrl-C: nothing more is submitted
            group_keys = [k for k, _ in group]
            entry = {"tag": uuid.uuid4().hex, "provider": self.provider, "id": None, "keys": group_keys,
                     "created": time.time()}
            ledger.record(entry)  # the intent: a kill before the id is recorded can still be found
            entry["id"] = self._api.create(entry["tag"], [line for _, line in group])
            ledger.record(entry)
            for k in group_keys:
                tries[k] += 1
            tally["batches_created"] += 1
            tally["batch_lines"] += len(group)
            batches.append(_Batch(entry, group_keys, total=len(group)))
        return batches

    def _report(self, batch: _Batch, progress: Callable[..., None] | None) -> None:
        if progress and batch.done > batch.reported:
            # lines the provider says are done count at once; their tokens when collected
            progress(batch.done - batch.reported, 0, note=None)
            batch.reported = batch.done

    @staticmethod
    def _note(batches: list[_Batch]) -> str:
        return "; ".join(f"batch {b.entry['id']}: {b.status}, {b.done} of {b.total} done, {b.failed} failed"
                         for b in batches[:4]) + (f"; {len(batches) - 4} more" if len(batches) > 4 else "")

    def close(self) -> None:
        pass


def _split(lines: list[tuple[str, dict]], max_requests: int, max_bytes: int, overhead: int) -> list[list]:
    """Lines in groups within the provider's limits, in order."""
    groups: list[list] = []
    size = 0
    for key, line in lines:
        width = len(json.dumps(line, ensure_ascii=False).encode()) + overhead
        if width > max_bytes:
            raise TeacherFatalError(f"request {key} is {width:,} bytes, more than a batch may hold ({max_bytes:,})")
        if not groups or len(groups[-1]) >= max_requests or size + width > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, line))
        size += width
    return groups


def _sleep(seconds: float) -> None:
    """Wait, checking the user's Ctrl-C every half second."""
    end = time.monotonic() + seconds
    while True:
        progress_hook.check()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.5, left))


def _calling(what: str, base_url: str | None, call: Callable[[], Any]) -> Any:
    """A provider call: refusals of the key or the model end the run; an unreachable provider
    fails the shard (retried later, the ledger keeps what was created)."""
    try:
        return call()
    except Exception as exc:
        status = getattr(exc, "status_code", None)
        message = secrets.redact(getattr(exc, "message", None) or str(exc))[:300]
        if status in (401, 403, 404):
            raise TeacherFatalError(f"batch API {endpoint(base_url)} answered {status} to {what}: {message}. Check the "
                                    "model name, the base URL and the key (from the environment or the Prefect "
                                    "Secret block)") from None
        if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
            raise TeacherFatalError(f"batch API {endpoint(base_url)} refused {what} ({status}): {message}") from None
        raise TeacherUnavailableError(f"batch API {endpoint(base_url)} did not answer {what}: "
                                      f"{type(exc).__name__}: {message}. Rerun to resume: batches created are "
                                      "kept and waited for, not submitted again") from None


def answered_in(way: str, text: str, fmt: Any) -> str:
    """How a batch line's answer came back: in the form every line of the API asks in (`way`)
    when its text is in that form, else "none": a server that ignores response_format answers
    in free text, and its lines must not be counted as constrained."""
    from reflectune.formats import from_json

    return way if from_json(text, fmt) is not None else "none"


# -- OpenAI: Files + Batches -----------------------------------------------------------------


class _OpenAIBatches:
    overhead = 1  # the newline of each JSONL line
    way = "json_schema"  # how a line asks for its output form
    ENDED = {"completed", "failed", "expired", "cancelled"}

    def __init__(self, model: str, base_url: str | None, api_key: str, timeout: float):
        import openai

        self.model, self.base_url = model, base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=3)

    def line(self, key: str, chat, sampling, fmt) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(chat), "max_tokens": sampling.max_new_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if fmt is not None:
            body["response_format"] = fmt.response_format()
        return {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}

    def create(self, tag: str, lines: list[dict[str, Any]]) -> str:
        data = openai_batch_file(lines)
        upload = _calling("the batch file upload", self.base_url,
                          lambda: self.client.files.create(file=(f"reflectune-{tag}.jsonl", data), purpose="batch"))
        batch = _calling("the batch creation", self.base_url, lambda: self.client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"reflectune": tag}))
        return batch.id

    def recover(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """The batch of a ledger entry recorded before its id, found by its tag; None if it was
        never created."""
        for batch in _calling("the batch listing", self.base_url, lambda: self.client.batches.list(limit=100)):
            if (batch.metadata or {}).get("reflectune") == entry["tag"]:
                return entry | {"id": batch.id}
            if batch.created_at < entry["created"] - 3600:
                break
        return None

    def status(self, batch: _Batch) -> bool:
        found = _calling(f"the status of batch {batch.entry['id']}", self.base_url,
                         lambda: self.client.batches.retrieve(batch.entry["id"]))
        batch.status = found.status
        counts = found.request_counts
        if counts is not None:
            batch.done, batch.failed, batch.total = counts.completed, counts.failed, counts.total or batch.total
        batch.entry["files"] = [found.output_file_id, found.error_file_id]
        if found.status == "failed":
            errors = "; ".join(f"{e.code}: {e.message}" for e in (found.errors.data if found.errors else [])[:3])
            raise TeacherFatalError(f"batch {found.id} failed validation at {endpoint(self.base_url)}: "
                                    f"{secrets.redact(errors) or 'no reason given'}")
        return found.status in self.ENDED

    def results(self, batch: _Batch) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for file_id in batch.entry.get("files") or []:
            if file_id:
                outcomes |= read_openai_results(_calling(f"the results of batch {batch.entry['id']}", self.base_url,
                                                         lambda: self.client.files.content(file_id).text))
        return outcomes


def openai_batch_file(lines: list[dict[str, Any]]) -> bytes:
    """An OpenAI batch input file: one request line per line of JSON."""
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def read_openai_results(text: str) -> dict[str, Outcome]:
    """The outcomes in an OpenAI batch output or error file, by custom id."""
    from reflectune.reflection import Generation

    outcomes: dict[str, Outcome] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        response = line.get("response") or {}
        status = response.get("status_code")
        body = response.get("body") or {}
        if status == 200:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            outcomes[line["custom_id"]] = Outcome(Generation(
                text=secrets.redact(choice["message"].get("content") or ""),
                prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                finish_reason=choice.get("finish_reason")))
        elif status is not None and 400 <= status < 500 and status not in (408, 409, 429):
            message = (body.get("error") or {}).get("message", "")
            outcomes[line["custom_id"]] = Outcome(error=f"HTTP {status}: {secrets.redact(str(message))[:300]}")
        else:  # expired, cancelled, 429 or 5xx: never answered
            outcomes[line["custom_id"]] = Outcome(error=RESEND)
    return outcomes


# -- Anthropic: Message Batches ----------------------------------------------------------------


class _AnthropicBatches:
    overhead = 2  # the comma and space between requests of the creation body
    way = None  # a result tells whether its forced tool answered (tool_use) or text came back
    TOOL = "reflection"

    def __init__(self, model: str, base_url: str | None, api_key: str, timeout: float):
        try:
            import anthropic
        except ImportError:
            raise TeacherFatalError("teacher.engine anthropic-batch needs the anthropic SDK: "
                                    "pip install 'reflectune[anthropic]'") from None
        self.model, self.base_url = model, base_url
        self.client = anthropic.Anthropic(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=3)

    def line(self, key: str, chat, sampling, fmt) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
        params: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_new_tokens,
                                  "messages": [m for m in chat if m["role"] != "system"],
                                  "temperature": min(1.0, sampling.temperature)}
        if system:
            params["system"] = system
        if sampling.top_p < 1.0:
            params["top_p"] = sampling.top_p
        if fmt is not None:  # the output form as a forced tool: its input is the JSON object
            params["tools"] = [{"name": self.TOOL, "description": "Write the reflection's fields.",
                                "input_schema": fmt.json_schema}]
            params["tool_choice"] = {"type": "tool", "name": self.TOOL}
        return {"custom_id": key, "params": params}

    def create(self, tag: str, lines: list[dict[str, Any]]) -> str:
        try:
            batch = _calling("the batch creation", self.base_url,
                             lambda: self.client.messages.batches.create(requests=lines))
        except TeacherFatalError as exc:  # a run's first request: a server of another protocol refuses it in its terms
            raise TeacherFatalError(
                f"{exc}. anthropic-batch speaks Anthropic's Message Batches API (POST BASE/v1/messages/batches, so "
                "teacher.base_url is BASE, without /v1); an OpenAI-compatible server's Files and Batches take "
                "teacher.engine openai-batch") from None
        return batch.id

    def recover(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        return None  # message batches carry no metadata to find an unrecorded one by

    def status(self, batch: _Batch) -> bool:
        found = _calling(f"the status of batch {batch.entry['id']}", self.base_url,
                         lambda: self.client.messages.batches.retrieve(batch.entry["id"]))
        counts = found.request_counts
        batch.status = found.processing_status
        batch.done = counts.succeeded
        batch.failed = counts.errored + counts.expired + counts.canceled
        batch.total = batch.total or sum((counts.processing, counts.succeeded, batch.failed))
        return found.processing_status == "ended"

    def results(self, batch: _Batch) -> dict[str, Outcome]:
        from reflectune.reflection import Generation

        outcomes: dict[str, Outcome] = {}
        found = _calling(f"the results of batch {batch.entry['id']}", self.base_url,
                         lambda: list(self.client.messages.batches.results(batch.entry["id"])))
        for item in found:
            result = item.result
            if result.type == "succeeded":
                message = result.message
                tool = [b for b in message.content if b.type == "tool_use"]
                text = json.dumps(tool[0].input) if tool else "".join(b.text for b in message.content if b.type == "text")
                outcomes[item.custom_id] = Outcome(Generation(
                    text=secrets.redact(text), prompt_tokens=message.usage.input_tokens,
                    completion_tokens=message.usage.output_tokens,
                    finish_reason="length" if message.stop_reason == "max_tokens" else "stop",
                    constrained="tool_use" if tool else "none"))
            elif result.type == "errored" and getattr(result.error.error, "type", "") == "invalid_request_error":
                outcomes[item.custom_id] = Outcome(error=f"refused: {secrets.redact(result.error.error.message)[:300]}")
            else:  # expired, canceled, or the provider's own error
                outcomes[item.custom_id] = Outcome(error=RESEND)
        return outcomes
