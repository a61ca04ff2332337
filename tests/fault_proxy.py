"""A small HTTP proxy on loopback that injects faults before passing requests through.

Faults are consumed one per request, in order: "429" (with Retry-After), "500", "503",
"400", "401", "close" (drop the connection without an answer), "pass". When the list is
empty every request passes through to the upstream server. `refuse` names request fields
the upstream is to be taken not to know: a request carrying one gets 400 ("refused"), as a
server without that feature answers.
"""

from __future__ import annotations

import asyncio
import json
import threading

REASONS = {400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error",
           503: "Service Unavailable"}


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, faults: list[str] | None = None, retry_after: float = 1,
                 port: int = 0, refuse: tuple[str, ...] = ()):
        self.upstream = (upstream_host, upstream_port)
        self.refuse = refuse
        self.faults = list(faults or [])
        self.retry_after = retry_after
        self.log: list[str] = []  # what each request got
        self.requests: list[bytes] = []  # raw request bytes, to check what was sent
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self.port = port
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_faults(self, faults: list[str]) -> None:
        with self._lock:
            self.faults = list(faults)
            self.log.clear()

    def close(self) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # a client may send several requests over one kept-alive connection
                request = await _read_request(reader, writer)
                if request is None:
                    break
                with self._lock:
                    fault = self.faults.pop(0) if self.faults else "pass"
                    if fault == "pass" and any(f'"{name}"'.encode() in request for name in self.refuse):
                        fault = "refused"
                    self.log.append(fault)
                    self.requests.append(request)
                if fault == "close":
                    writer.transport.abort()
                    return
                if fault == "pass":
                    writer.write(await self._forward(request))
                elif fault == "refused":
                    writer.write(self._error(400))
                else:
                    writer.write(self._error(int(fault)))
                await writer.drain()
                writer.close()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    def _error(self, status: int) -> bytes:
        body = json.dumps({"error": {"message": f"injected {status}", "type": "injected", "code": status}}).encode()
        headers = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", "Content-Type: application/json",
                   f"Content-Length: {len(body)}", "Connection: close"]
        if status == 429:
            headers.append(f"Retry-After: {self.retry_after}")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + body

    async def _forward(self, request: bytes) -> bytes:
        head, _, body = request.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        lines.append(b"Connection: close")  # so the upstream ends its answer with EOF
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await up_writer.drain()
        response = await up_reader.read(-1)
        up_writer.close()
        return response


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length, lines = 0, []
    for line in head[:-4].split(b"\r\n"):
        lower = line.lower()
        if lower.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        if lower.startswith(b"expect:") and b"100-continue" in lower:
            # S3 clients wait for this before sending a body; upstream gets the request without it
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            continue
        lines.append(line)
    body = await reader.readexactly(length) if length else b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
