"""What a run will cost before it runs: rows, shards, tokens read and written per stage, and
time per stage from throughput that was measured (`make bench`) or is given.

Token counts use the student's tokenizer on the real rows: the student's sequences are built
exactly as the scorer builds them; teacher prompts are the real reflection prompts. What the
teacher will write is not known ahead, so it is estimated as the pair restated plus
`analysis_tokens` of reasoning, capped by max_new_tokens. With `verify`, each of the three
rewrites of a pair costs one more request, about the pair's length read and one word written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reflectune import intake, prompts, scoring, templates
from reflectune.engines import BATCH_ENGINES, DEFAULT_ENGINE
from reflectune.journal import dollars
from reflectune.reflection import MAX_NEW_TOKENS

# Tokens/s measured on the reference CPU host (2 cores, fp32) with SmolLM2-135M; scaled to
# other models by parameter count. GPU rows follow the H100 estimates in docs/gpu.md (bf16):
# prefill at ~45% of 989 TFLOP/s, decode at ~45% of prefill at large batch.
CPU_MEASURED_135M = {"teacher:transformers": 22.0, "teacher:vllm": 56.0, "teacher:openai": 53.0,
                     "student:transformers": 400.0, "student:vllm": 200.0}
PACKAGED_PARAMS = 134.5e6
BATCH_WINDOW_SECONDS = 24 * 3600  # the providers' completion window
H100_FLOPS, EFFICIENCY, DECODE_SHARE = 989e12, 0.45, 0.45


@dataclass
class Stage:
    name: str
    reads: int  # tokens
    writes: int  # tokens
    tokens_per_second: float
    basis: str

    @property
    def seconds(self) -> float:
        work = self.writes if self.name == "teacher" else self.reads
        return work / self.tokens_per_second if self.tokens_per_second > 0 else math.nan


def plan(uri: str, tokenizer: Any, *, column_map: dict[str, str] | None = None, limit: int | None = None,
         shard_size: int = 512, teacher_engine: str = DEFAULT_ENGINE, student_engine: str = DEFAULT_ENGINE,
         template: str = templates.DEFAULT_TEMPLATE, max_length: int = scoring.MAX_LENGTH, max_new_tokens: int = MAX_NEW_TOKENS, epochs: float = 3.0,
         device: str = "cpu", teacher_params: float = PACKAGED_PARAMS, student_params: float = PACKAGED_PARAMS,
         analysis_tokens: int = 150, throughput: dict[str, float] | None = None, price_input_per_m: float = 0.0,
         price_output_per_m: float = 0.0, budget_tokens: int | None = None, budget_usd: float | None = None,
         batch_prices: tuple[float, float] | None = None, verify: bool = False) -> dict[str, Any]:
    """The plan of a run. `batch_prices`: where the teacher is a batch API, its prices per
    million prompt and completion tokens (the cost is given at them, the online cost beside)."""
    data = intake.load(uri, column_map, limit)
    rows = data.valid.to_dicts()
    n = len(rows)
    count = lambda texts: sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0

    ins_prompts = [_chat_text(prompts.instruction_reflection(r["instruction"], r["input"], r["output"], max_new_tokens))
                   for r in rows]
    res_prompts = [_chat_text(prompts.response_reflection(r["instruction"], r["input"], r["output"], max_new_tokens))
                   for r in rows]
    pair_tokens = [count([r["instruction"] + "\n" + r["input"] + "\n" + r["output"]]) for r in rows]
    per_answer = [min(max_new_tokens, p + analysis_tokens) for p in pair_tokens]
    # ins, res and ins_res: the ins_res prompt is about as long as the res prompt
    teacher_reads = count(ins_prompts) + 2 * count(res_prompts)
    teacher_writes = 3 * sum(per_answer)
    verify_tokens = 0
    if verify:  # one verification per rewrite; a rewrite is about as long as its original
        verify_tokens = 3 * count([_chat_text(prompts.verification(r["instruction"], r["input"], r["output"]))
                                   for r in rows]) + 3 * n
        teacher_reads += verify_tokens - 3 * n
        teacher_writes += 3 * n

    sequences = scoring.build_sequences(rows, tokenizer, template, max_length)
    orig_tokens = sum(len(s.ids) for parts in sequences for s in parts.values() if not isinstance(s, str))
    student_reads = 4 * orig_tokens  # four variants of about the original's length
    # training: one pair per selected sample (at most n), forward and backward ~3x a forward pass
    train_reads = int(epochs * orig_tokens / 2)

    given = throughput or {}
    stages = [
        _stage("teacher", teacher_reads, teacher_writes, f"teacher:{teacher_engine}", device, teacher_params, given, True),
        _stage("student", student_reads, 0, f"student:{student_engine}", device, student_params, given, False),
        _stage("train", train_reads, 0, "train", device, student_params, given, False),
    ]
    online = (teacher_reads * price_input_per_m + teacher_writes * price_output_per_m) / 1e6
    cost = {"tokens": teacher_reads + teacher_writes, "usd": online,
            "priced": bool(price_input_per_m or price_output_per_m),
            "budget_tokens": budget_tokens, "budget_usd": budget_usd, "verify_tokens": verify_tokens}
    if batch_prices is not None:
        cost |= {"usd": (teacher_reads * batch_prices[0] + teacher_writes * batch_prices[1]) / 1e6,
                 "online_usd": online, "batch": True, "priced": bool(any(batch_prices) or cost["priced"])}
    return {"source": uri, **data.counts, "shards": math.ceil(n / shard_size) if n else 0, "stages": stages,
            "teacher_cost": cost}


def _stage(name: str, reads: int, writes: int, key: str, device: str, params: float, given: dict[str, float],
           decode: bool) -> Stage:
    if name in given:
        return Stage(name, reads, writes, given[name], "given")
    if key.split(":")[-1] in BATCH_ENGINES:
        return Stage(name, reads, writes, writes / BATCH_WINDOW_SECONDS if writes else math.inf,
                     "a batch API answers within 24 hours (the provider's window; often sooner)")
    if key == "train" and device == "cpu":
        # a training step is a forward and a backward pass: about three forward passes
        tps = CPU_MEASURED_135M["student:transformers"] * PACKAGED_PARAMS / params / 3
        return Stage(name, reads, writes, tps, "a third of the measured forward rate")
    if device == "cpu" or key == "teacher:openai":
        tps = CPU_MEASURED_135M[key] * PACKAGED_PARAMS / params
        basis = "measured, 2 CPU cores, 135M model" + (", scaled by size" if abs(params / PACKAGED_PARAMS - 1) > 0.05 else "")
        if key == "teacher:openai":
            basis = "measured against a vllm serve on CPU; an API's rate is its own"
        return Stage(name, reads, writes, tps, basis)
    prefill = EFFICIENCY * H100_FLOPS / (2 * params)
    tps = prefill * (DECODE_SHARE if decode else 1.0) / (3.0 if name == "train" else 1.0)
    return Stage(name, reads, writes, tps, "H100 estimate from FLOP bound")


def parse_size(text: str) -> float:
    """'135M', '7B', '70e9' -> parameters."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise ValueError(f"model size '{text}': write it like 135M, 7B or 70B") from None


def _chat_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['source']}: {result['input_rows']} rows, {result['valid_rows']} valid, "
        f"{result['rejected_rows']} rejected ({result['duplicate_rows']} duplicates), {result['shards']} shards",
        "",
        f"{'stage':<8} {'reads (tok)':>12} {'writes (tok)':>13} {'tok/s':>10} {'time':>10}  basis",
    ]
    total = 0.0
    for s in result["stages"]:
        total += s.seconds
        lines.append(f"{s.name:<8} {s.reads:>12,} {s.writes:>13,} {s.tokens_per_second:>10,.0f} "
                     f"{_duration(s.seconds):>10}  {s.basis}")
    lines.append(f"{'total':<8} {'':>12} {'':>13} {'':>10} {_duration(total):>10}")
    cost = result.get("teacher_cost")
    if cost:
        lines += ["", cost_line(cost)]
    return "\n".join(lines)


def cost_line(cost: dict[str, Any]) -> str:
    """The teacher's estimated spend beside the budget, and whether the estimate passes it."""
    line = f"teacher: about {cost['tokens']:,} tokens"
    if cost.get("verify_tokens"):
        line += f" ({cost['verify_tokens']:,} of them verifying the rewrites)"
    if cost.get("batch"):
        line += (f", ${dollars(cost['usd'])} at the batch prices (${dollars(cost['online_usd'])} through the online "
                 "API); answers within 24 hours" if cost["priced"] else
                 " (no price given: --price-input-per-m, --price-output-per-m; a batch API's is half); answers "
                 "within 24 hours")
    else:
        line += (f", ${dollars(cost['usd'])} at the prices given" if cost["priced"]
                 else " (no price given: --price-input-per-m, --price-output-per-m)")
    over = []
    if cost.get("budget_tokens") is not None:
        line += f"; budget {cost['budget_tokens']:,} tokens"
        if cost["tokens"] > cost["budget_tokens"]:
            over.append(_times(cost["tokens"], cost["budget_tokens"], "token"))
    if cost.get("budget_usd") is not None:
        line += f"; budget ${dollars(cost['budget_usd'])}"
        if cost["priced"] and cost["usd"] > cost["budget_usd"]:
            over.append(_times(cost["usd"], cost["budget_usd"], "dollar"))
    if over:
        line += (f". The estimate is {' and '.join(over)}: the run would stop there (a rerun with a larger budget "
                 "goes on without paying twice)")
    return line


def _times(estimate: float, budget: float, unit: str) -> str:
    # a budget of 0 or less is refused where it is given (TeacherConfig); here it is only named
    return f"{estimate / budget:.1f}x the {unit} budget" if budget > 0 else f"past the {unit} budget"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
