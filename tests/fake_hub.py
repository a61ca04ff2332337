"""A model hub on loopback that speaks the part of the Hugging Face hub protocol that
`huggingface_hub` uses to fetch files (file metadata by HEAD, file content by GET, a
repository's file list), serving one repository from a folder and logging every request."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo: str, folder: Path):
        self.repo, self.folder = repo, folder
        self.requests: list[str] = []  # "METHOD path" of every request
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"{handler.command} {path}")
        files = sorted(p.name for p in self.folder.iterdir())
        if path.startswith(f"/api/models/{self.repo}/tree/"):
            tree = [{"type": "file", "path": f, "size": (self.folder / f).stat().st_size,
                     "oid": hashlib.sha1((self.folder / f).read_bytes()).hexdigest()} for f in files]
            return self._send(handler, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        if path.startswith(f"/api/models/{self.repo}"):
            data = json.dumps({"id": self.repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}).encode()
            return self._send(handler, 200, data, body, {"Content-Type": "application/json"})
        prefix = f"/{self.repo}/resolve/"
        name = path[len(prefix):].partition("/")[2] if path.startswith(prefix) else ""
        if name not in files:
            return self._send(handler, 404, b"not found", body, {"X-Error-Code": "EntryNotFound"})
        data = (self.folder / name).read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        self._send(handler, 200, data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})

    @staticmethod
    def _send(handler, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
