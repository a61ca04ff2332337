"""Student scores: IFD and reversed-IFD of every pair (METHOD.md, "Student scores").

This module decides *what* is scored: the four token sequences of a pair, their label spans
and the reference truncation rules; and how the four mean losses become PPL, IFD and r-IFD.
An engine only turns token sequences into mean negative log-likelihoods, so every engine
scores exactly the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import polars as pl

from reflectune import templates
from reflectune.records import SCORES

PARTS = ("q_direct", "a_direct", "q_condition", "a_condition")


@dataclass(frozen=True)
class TokenSequence:
    """Token ids of one forward pass; tokens ids[label_start:] are scored (label_start >= 1)."""

    ids: tuple[int, ...]
    label_start: int

    @property
    def n_labels(self) -> int:
        return len(self.ids) - self.label_start


class StudentEngine(Protocol):
    """What the scorer needs from an engine: the student's tokenizer, the longest sequence it
    can score (None: any that max_length allows), and the mean NLL of the labelled tokens of
    each sequence. What a row's content rules out is decided here before the engine runs, so
    an engine that raises has failed for a reason of its own: the exception propagates and
    the shard is redone, never written with NaN for rows that did nothing wrong."""

    tokenizer: Any
    max_sequence: int | None

    def token_nll(self, sequences: Sequence[TokenSequence], progress: Callable[[int], None] | None = None) -> list[float]: ...


def build_sequences(
    rows: Sequence[dict[str, str]], tokenizer: Any, template: str = templates.DEFAULT_TEMPLATE, max_length: int = 2048
) -> list[dict[str, TokenSequence | str]]:
    """For every row, the four sequences of PARTS, or the reason a part cannot be scored."""
    templates.check_template(template)
    prompts = [templates.render(template, r["instruction"], r.get("input") or "", tokenizer) for r in rows]
    reverses = [templates.reverse(template, r["output"], tokenizer) for r in rows]
    questions = [templates.question(r["instruction"], r.get("input") or "") for r in rows]
    answers = [r["output"] for r in rows]

    # A chat template writes its own special tokens; the text templates get the tokenizer's.
    specials = template != "chat"
    p_ids = _encode(tokenizer, prompts, specials)
    r_ids = _encode(tokenizer, reverses, specials)
    q_ids = _encode(tokenizer, questions, False)
    a_ids = _encode(tokenizer, answers, False)
    bos = list(tokenizer("", add_special_tokens=True)["input_ids"])

    out = []
    for i, row in enumerate(rows):
        parts: dict[str, TokenSequence | str] = {}
        if not row["output"].strip():
            out.append({part: "empty response" for part in PARTS})
            continue
        parts["a_condition"] = _conditional(p_ids[i], a_ids[i], max_length)
        parts["a_direct"] = _direct(bos, a_ids[i], len(p_ids[i]), max_length)
        if not row["instruction"].strip():
            parts["q_condition"] = parts["q_direct"] = "empty instruction"
        else:
            parts["q_condition"] = _conditional(r_ids[i], q_ids[i], max_length)
            parts["q_direct"] = _direct(bos, q_ids[i], len(r_ids[i]), max_length)
        out.append(parts)
    return out


def _encode(tokenizer: Any, texts: list[str], specials: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=specials)["input_ids"]]


def _conditional(prompt: list[int], target: list[int], max_length: int) -> TokenSequence | str:
    ids = (prompt + target)[:max_length]
    start = max(len(prompt), 1)
    if start >= len(ids):
        return f"prompt of {len(prompt)} tokens fills max_length {max_length}"
    return TokenSequence(tuple(ids), start)


def _direct(bos: list[int], target: list[int], prompt_len: int, max_length: int) -> TokenSequence | str:
    # Reference rule: the direct text may be as long as the conditional text leaves room for.
    limit = max_length - min(prompt_len, max_length) + 1
    ids = (bos + target)[:limit]
    if len(bos + target) < 2:
        # without a BOS token the first token is only context, as in the reference code
        return "a one-token text has nothing to score: the tokenizer adds no BOS token"
    if len(ids) < 2:
        return f"no token of the text left to score after truncation to {limit} tokens"
    return TokenSequence(tuple(ids), 1)


def score_rows(
    rows: Sequence[dict[str, str]],
    engine: StudentEngine,
    template: str = templates.DEFAULT_TEMPLATE,
    max_length: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, float | str | None]]:
    """Score columns (records.SCORES) for each row, in order. What a row's content rules out
    is NaN with a reason; an engine failure raises. `progress(advance, total)` is called with
    token counts as batches finish."""
    built = build_sequences(rows, engine.tokenizer, template, max_length)
    limit = getattr(engine, "max_sequence", None)
    for parts in built:
        for part, seq in parts.items():
            if isinstance(seq, TokenSequence) and limit is not None and len(seq.ids) > limit:
                parts[part] = (f"a sequence of {len(seq.ids)} tokens does not fit the engine's context of {limit} "
                               "tokens: raise vllm.max_model_len or lower max_length")
    todo = [(i, part, seq) for i, parts in enumerate(built) for part, seq in parts.items() if isinstance(seq, TokenSequence)]
    total = sum(len(seq.ids) for _, _, seq in todo)
    advance = (lambda n: progress(n, total)) if progress else None
    results = list(engine.token_nll([seq for _, _, seq in todo], advance)) if todo else []
    losses: list[dict[str, float]] = [{} for _ in rows]
    errors: list[dict[str, str]] = [{part: seq for part, seq in parts.items() if isinstance(seq, str)} for parts in built]
    for (i, part, _), result in zip(todo, results):
        if not math.isfinite(result):
            errors[i][part] = f"non-finite loss {result}"
        else:
            losses[i][part] = result
    return [_combine(losses[i], errors[i]) for i in range(len(rows))]


def _combine(loss: dict[str, float], errors: dict[str, str]) -> dict[str, float | str | None]:
    nan = float("nan")
    get = lambda part: loss.get(part, nan)  # noqa: E731
    row: dict[str, float | str | None] = {}
    for part in PARTS:
        row[f"loss_{part}"] = get(part)
        row[f"ppl_{part}"] = math.exp(get(part)) if part in loss else nan
    row["ifd_ppl"] = _ratio(row["ppl_a_condition"], row["ppl_a_direct"])
    row["rifd_ppl"] = _ratio(row["ppl_q_condition"], row["ppl_q_direct"])
    row["ifd_loss"] = _ratio(row["loss_a_condition"], row["loss_a_direct"])
    row["rifd_loss"] = _ratio(row["loss_q_condition"], row["loss_q_direct"])
    row["score_error"] = "; ".join(f"{part}: {why}" for part, why in sorted(errors.items())) or None
    return row


def _ratio(num: Any, den: Any) -> float:
    if math.isnan(num) or math.isnan(den) or den == 0:
        return float("nan")
    return num / den


def score_table(
    df: pl.DataFrame,
    engine: StudentEngine,
    template: str = templates.DEFAULT_TEMPLATE,
    max_length: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """`df` (instruction, input, output, ...) with the score columns added, rows in order."""
    rows = df.select("instruction", "input", "output").to_dicts()
    scores = score_rows(rows, engine, template, max_length, progress)
    scored = pl.DataFrame(scores, schema=SCORES) if scores else pl.DataFrame(schema=SCORES)
    return pl.concat([df.drop([c for c in SCORES if c in df.columns]), scored], how="horizontal")

