"""Teacher engine for any OpenAI-compatible chat endpoint (OpenAI, `vllm serve`, others).

Requests run concurrently under a limit. A request that fails with 429, 5xx, a timeout or a
dropped or refused connection is retried with exponential backoff and jitter, waiting at least
what a Retry-After header asks; when its retries are spent the endpoint is down, not the row
at fault, so the call raises (the shard fails and is redone later, never written as a
fallback). 401/403/404 raise at once (the key or the model is wrong and no retry can help); a
400 fails that request only, a fact about its content. The API key is held privately and
never appears in messages, ids or records.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from reflectune.errors import ReflectuneError

RETRYABLE = {408, 409, 429}
FATAL = {401: "the API key was refused", 403: "the API key may not use this model",
         404: "the endpoint or the model name does not exist"}


class TeacherFatalError(ReflectuneError):
    """The endpoint refuses every request: wrong key, model or URL."""


class TeacherUnavailableError(ReflectuneError):
    """The endpoint did not answer a request within its retries."""


def endpoint(base_url: str | None) -> str:
    """The endpoint as it may be shown: scheme, host, port and path, never a user part or query
    (a URL may carry credentials there)."""
    if not base_url:
        return "https://api.openai.com/v1"
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def teacher_id(model: str, base_url: str | None) -> str:
    """The teacher's identity in records and cache keys: the served model and the host."""
    host = urlsplit(base_url).netloc.rpartition("@")[2] if base_url else "api.openai.com"
    return f"openai:{model}@{host}"


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "retries", "prompt_tokens", "completion_tokens", "failed")}


class OpenAITeacher:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 300.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        self.model = model
        self.base_url = base_url
        # local servers (vllm serve without --api-key) accept any key
        self._api_key = api_key or os.environ.get(api_key_env) or "no-key"
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.teacher_id = teacher_id(model, base_url)
        self.usage = Usage()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, chats: Sequence[list[dict[str, str]]], sampling: Any,
                 progress: Callable[[int], None] | None = None) -> list[Any]:
        coro = self._generate_all(list(chats), sampling, progress)
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

    async def _generate_all(self, chats, sampling, progress):
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(chat):
            async with semaphore:
                gen = await self._request(client, chat, sampling)
            if progress:
                progress(1)
            return gen

        try:
            tasks = [asyncio.ensure_future(one(chat)) for chat in chats]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.close()

    async def _request(self, client, chat, sampling):
        import openai

        from reflectune.reflection import Generation

        args: dict[str, Any] = {"model": self.model, "messages": chat, "max_tokens": sampling.max_new_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            args["seed"] = sampling.seed
        last = ""
        for attempt in range(self.max_retries + 1):
            self.usage.add(requests=1, retries=1 if attempt else 0)
            wait = None
            try:
                response = await client.chat.completions.create(**args)
            except openai.APIStatusError as exc:
                status = exc.status_code
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
                wait = _retry_after(exc.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                last = f"{type(exc).__name__}: {_brief(exc)}"
            else:
                choice = response.choices[0]
                usage = response.usage
                prompt_tokens = usage.prompt_tokens if usage else 0
                completion_tokens = usage.completion_tokens if usage else 0
                self.usage.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
                return Generation(text=choice.message.content or "", prompt_tokens=prompt_tokens,
                                  completion_tokens=completion_tokens, finish_reason=choice.finish_reason)
            if attempt < self.max_retries:
                backoff = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(backoff, min(wait or 0.0, self.backoff_max)))
        self.usage.add(failed=1)
        raise TeacherUnavailableError(
            f"teacher endpoint {endpoint(self.base_url)} (model '{self.model}') did not answer in "
            f"{self.max_retries + 1} attempts; the last: {last}. Check that the server is up and reachable")

    def close(self) -> None:
        pass


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
    message = getattr(exc, "message", None) or str(exc)
    return message[:300]
