"""Teacher engine for any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, others).

Requests run concurrently under a limit. A request that fails with 429, 5xx, a timeout or a
dropped or refused connection is retried with exponential backoff and jitter, waiting at least
what a Retry-After header asks; when its retries are spent the endpoint is down, not the row
at fault, so the call raises (the shard fails and is redone later, never written as a
fallback). The user's Ctrl-C ends every wait (the pacer's, a retry's backoff) and nothing is
sent after it; requests in flight get a few seconds to bring their answers home. 401/403/404 raise at once (the key or the model is wrong and no retry can help); a
400 fails that request only, a fact about its content. The API key is held privately and
never appears in messages, ids or records.

Output formats are enforced as the server allows, found out on the first request that asks:
vLLM's `structured_outputs` regex (with its `repetition_penalty`), else an OpenAI
`response_format` JSON schema, else nothing (the tolerant parser reads free text). A server
that rejects a way with 400, or answers without following it, is asked the next way; each
generation records the way that held.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from reflectune.engines.pacing import Pacer
from reflectune.formats import CHARS_PER_TOKEN
from reflectune import progress as progress_hook
from reflectune import secrets
from reflectune.errors import ReflectuneError

RETRYABLE = {408, 409, 429}
# after the user's Ctrl-C nothing more is sent; requests already sent get this long to bring
# home the answers paid for (the journal keeps them), so the run still stops in seconds
GRACE_SECONDS = 5.0
FATAL = {401: "the API key was refused", 403: "the API key may not use this model",
         404: "the endpoint or the model name does not exist"}


class TeacherFatalError(ReflectuneError):
    """The endpoint refuses every request: wrong key, model or URL."""


class TeacherUnavailableError(ReflectuneError):
    """The endpoint did not answer a request within its retries: it may be back later."""

    retryable = True


def endpoint(base_url: str | None) -> str:
    """The endpoint as it may be shown: scheme, host, port and path, never a user part or query
    (a URL may carry credentials there)."""
    if not base_url:
        return "https://api.openai.com/v1"
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def teacher_id(model: str, base_url: str | None) -> str:
    """The teacher as records name it: the served model and the host it was reached at."""
    host = urlsplit(base_url).netloc.rpartition("@")[2] if base_url else "api.openai.com"
    return f"openai:{model}@{host}"


# hosts that name a provider: there the provider is part of who answers, since the same model
# name at another provider may be another build, quantization or version of it
PROVIDERS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic", "api.together.xyz": "together",
             "api.groq.com": "groq", "api.fireworks.ai": "fireworks", "api.deepseek.com": "deepseek",
             "api.mistral.ai": "mistral", "openrouter.ai": "openrouter", "api.deepinfra.com": "deepinfra",
             "generativelanguage.googleapis.com": "google", "api.x.ai": "xai"}


def identity(protocol: str, model: str, base_url: str | None, default_host: str) -> str:
    """Who answers, as request keys know it (reflection.request_key): the protocol and the
    model as the server names it, and at a well-known provider (PROVIDERS) the provider. Never
    the host or the port: the same model behind a server that moved (a restarted `vllm serve`
    on another port, a new load balancer) is the same teacher, and its answers are not paid
    for again. Any other host is taken for a server of one's own, known by its model name."""
    host = (urlsplit(base_url).hostname if base_url else None) or default_host
    provider = PROVIDERS.get(host.lower())
    return f"{protocol}:{model}" + (f"@{provider}" if provider else "")


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0  # answered 429
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class OpenAITeacher:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 16,
        timeout: float = 300.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        self.model = model
        self.base_url = base_url
        # local servers (vllm serve without --api-key) accept any key
        self._api_key = api_key or os.environ.get(api_key_env or "OPENAI_API_KEY") or "no-key"
        secrets.register(self._api_key)
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.teacher_id = teacher_id(model, base_url)
        self.identity = identity("openai", model, base_url, "api.openai.com")
        self.usage = Usage()
        # kept across calls: what the provider's limits allow now
        self.pacer = Pacer(concurrency)
        # an async callable every request awaits first: a limit shared with other workers
        # (the flow's tasks set it to a Prefect global concurrency limit)
        self.shared_limit: Callable[[], Awaitable[None]] | None = None
        # how this server takes output formats: None until a request found out
        self.constraint: str | None = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, chats: Sequence[list[dict[str, str]]], sampling: Any,
                 progress: Callable[[int, int], None] | None = None, formats: Sequence[Any] | None = None, *,
                 admit: Callable[[int], bool] | None = None,
                 done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """One generation per chat (reflection.TeacherEngine). `admit(i)` is asked just before
        chat i is first sent: once it says no, nothing more is sent and the chats left get
        `reflection.NOT_SENT`; requests in flight finish. `done(i, generation)` is called as
        each request returns."""
        if sampling.constrained == "off" or formats is None:
            formats = [None] * len(chats)
        coro = self._generate_all(list(chats), sampling, progress, list(formats), admit, done)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # called from inside an event loop (e.g. an async flow): run on a private loop
        result: list[Any] = []
        error: list[BaseException] = []

        def runner() -> None:
            try:
                result.extend(asyncio.run(coro))
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        thread = threading.Thread(target=runner)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result

    async def _generate_all(self, chats, sampling, progress, formats, admit, done):
        import openai

        from reflectune.reflection import NOT_SENT, Generation

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout)
        # at most `concurrency` requests wait on the pacer, which may allow fewer in flight
        semaphore = asyncio.Semaphore(self.concurrency)
        probe = asyncio.Lock()
        refused = False

        def admitted(i: int) -> bool:
            nonlocal refused
            refused = refused or (admit is not None and not admit(i))
            return not refused

        async def one(i, chat, fmt):
            async with semaphore:
                progress_hook.check()  # the user's Ctrl-C: nothing more is sent
                if refused:
                    return Generation(error=NOT_SENT)
                if fmt is not None and self.constraint is None:
                    async with probe:  # the first constrained request finds out alone how the server takes formats
                        if self.constraint is None:
                            return finish(i, await self._constrained(client, chat, sampling, fmt, lambda: admitted(i)))
                return finish(i, await self._constrained(client, chat, sampling, fmt, lambda: admitted(i)))

        def finish(i, gen):
            if gen.error != NOT_SENT:
                if done:
                    done(i, gen)
                if progress:
                    progress(1, gen.completion_tokens)
            return gen

        tasks = [asyncio.ensure_future(one(i, chat, fmt)) for i, (chat, fmt) in enumerate(zip(chats, formats))]
        telling = asyncio.ensure_future(self._tell_waits(progress)) if progress else None
        try:
            pending = set(tasks)
            while pending and not progress_hook.stop.is_set():
                finished, pending = await asyncio.wait(pending, timeout=progress_hook.TICK,
                                                       return_when=asyncio.FIRST_EXCEPTION)
                failed = [t for t in finished if not t.cancelled() and t.exception() is not None]
                if failed and not progress_hook.stop.is_set():
                    raise failed[0].exception()
            if progress_hook.stop.is_set():
                if pending:  # what waits ends at once (Interrupted); what is in flight gets its grace
                    await asyncio.wait(pending, timeout=GRACE_SECONDS)
                progress_hook.check()
            return [t.result() for t in tasks]
        finally:
            for task in [*tasks, telling]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*tasks, *([telling] if telling else []), return_exceptions=True)
            await client.close()

    async def _tell_waits(self, progress) -> None:
        """Say on the progress bar when requests wait on the provider's limits, and for how long
        (the tokens/s figure alone cannot tell a wait from a stall)."""
        shown = ""
        try:
            while True:
                await asyncio.sleep(1.0)
                held = self.pacer.holding()
                note = f"waiting {math.ceil(held[0])} s: {held[1]}" if held and held[0] >= 2.0 else ""
                if note != shown:
                    progress(0, 0, note=note)
                    shown = note
        finally:
            if shown:
                progress(0, 0, note="")

    async def _constrained(self, client, chat, sampling, fmt, admit):
        """One generation in the first way of enforcing `fmt` that this server honours.
        `admit()` is asked before the request is first sent."""
        from reflectune.reflection import NOT_SENT

        if fmt is None or self.constraint == "none":
            return await self._request(client, chat, sampling, None, fmt, admit)
        if self.constraint is not None:
            return await self._request(client, chat, sampling, self.constraint, fmt, admit)
        for way in ("regex", "json_schema"):
            gen = await self._request(client, chat, sampling, way, fmt, admit)
            if gen.error == NOT_SENT:
                return gen
            if gen.error is not None:
                continue  # refused (400): try the next way
            if gen.finish_reason == "stop":
                if not _follows(gen.text, way, fmt):
                    continue  # accepted but ignored: try the next way
                self.constraint = way
            return gen  # cut off by the limit: it cannot be checked, the next request asks again
        if sampling.constrained == "on":
            raise TeacherFatalError(
                f"teacher endpoint {endpoint(self.base_url)} takes neither vLLM's structured outputs nor JSON-schema "
                "response formats, and teacher.constrained is on: set it to auto (free text, parsed) or off")
        gen = await self._request(client, chat, sampling, None, fmt, admit)
        # refused even without a format: the request itself is at fault, not the ways tried
        self.constraint = "none" if gen.error is None else None
        return gen

    async def _request(self, client, chat, sampling, way, fmt, admit):
        import openai

        from reflectune.reflection import NOT_SENT, Generation

        args: dict[str, Any] = {"model": self.model, "messages": chat, "max_tokens": sampling.max_new_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            args["seed"] = sampling.seed
        if way == "regex":  # vLLM's own request fields
            args["extra_body"] = {"structured_outputs": {"regex": fmt.regex},
                                  "repetition_penalty": sampling.repetition_penalty}
        elif way == "json_schema":
            args["response_format"] = fmt.response_format()
        expected = self.pacer.estimate(prompt_tokens(chat), sampling.max_new_tokens)
        last = ""
        for attempt in range(self.max_retries + 1):
            # every wait ends at the user's Ctrl-C, and nothing is sent after it
            ticket = await progress_hook.interruptible(self.pacer.acquire(*expected))
            try:
                if attempt == 0 and not admit():
                    self.pacer.cancel(ticket)
                    return Generation(error=NOT_SENT)
                if self.shared_limit is not None:
                    await progress_hook.interruptible(self.shared_limit())
                progress_hook.check()
            except BaseException:
                self.pacer.cancel(ticket)
                raise
            self.usage.add(requests=1, retries=1 if attempt else 0)
            wait = None
            try:
                raw = await client.chat.completions.with_raw_response.create(**args)
                response = raw.parse()
            except openai.APIStatusError as exc:
                status = exc.status_code
                wait = _retry_after(exc.response.headers)
                self.pacer.release(ticket, status, exc.response.headers, retry_after=wait)
                if status == 429:
                    self.usage.add(rate_limited=1)
                if status in FATAL:
                    raise TeacherFatalError(
                        f"teacher endpoint {endpoint(self.base_url)} answered {status} for model "
                        f"'{self.model}': {FATAL[status]}. Check the model name, the base URL and the key "
                        "(from the environment or the Prefect Secret block)"
                    ) from None
                if status not in RETRYABLE and status < 500:
                    self.usage.add(failed=1)
                    return Generation(error=f"HTTP {status}: {_brief(exc)}")
                last = f"HTTP {status}"
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                self.pacer.release(ticket, None)
                last = f"{type(exc).__name__}: {_brief(exc)}"
            else:
                choice = response.choices[0]
                usage = response.usage
                prompt = usage.prompt_tokens if usage else 0
                completion = usage.completion_tokens if usage else 0
                self.pacer.release(ticket, raw.http_response.status_code, raw.headers,
                                   (prompt, completion) if usage else None)
                self.usage.add(prompt_tokens=prompt, completion_tokens=completion)
                return Generation(text=secrets.redact(choice.message.content or ""), prompt_tokens=prompt,
                                  completion_tokens=completion, finish_reason=choice.finish_reason,
                                  constrained=way or "none")
            if attempt < self.max_retries:
                backoff = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
                # a Retry-After pauses the pacer for every request; this one waits at least as long
                await progress_hook.interruptible(asyncio.sleep(max(backoff, min(wait or 0.0, self.backoff_max))))
        self.usage.add(failed=1)
        raise TeacherUnavailableError(
            f"teacher endpoint {endpoint(self.base_url)} (model '{self.model}') did not answer in "
            f"{self.max_retries + 1} attempts; the last: {last}. Check that the server is up and reachable")

    def close(self) -> None:
        pass


def prompt_tokens(chat: list[dict[str, str]]) -> int:
    """A chat's prompt tokens as counted before sending: the provider's tokenizer is not at
    hand, so about 3.5 characters a token (on the side of more), plus the message framing."""
    return sum(int(len(m.get("content") or "") / CHARS_PER_TOKEN) + 4 for m in chat)


def _follows(text: str, way: str, fmt: Any) -> bool:
    """Whether a finished generation has the form it was asked for (a server may ignore
    fields it does not know)."""
    if way == "regex":
        return re.fullmatch(fmt.regex, text) is not None
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _retry_after(headers: Any) -> float | None:
    """Seconds from Retry-After (seconds or an HTTP date) or retry-after-ms."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            from datetime import datetime, timezone

            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None


def _brief(exc: Exception) -> str:
    """An error's message as it may be recorded: an endpoint may echo credentials in it."""
    message = getattr(exc, "message", None) or str(exc)
    return secrets.redact(message)[:300]
