"""Student scores: IFD and reversed-IFD of every pair (docs/method.md, "Student scores").

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

# the longest sequence scored or trained on, in tokens (the paper's 2048) unless told otherwise
MAX_LENGTH = 2048

PARTS = ("q_direct", "a_direct", "q_condition", "a_condition")
# what a score means; part of every cached score's key. v2: the reference's token boundary,
# instruction and input joined as the reference, identical sequences scored once
SCORING_VERSION = "scores/v2"


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
    rows: Sequence[dict[str, str]], tokenizer: Any, template: str = templates.DEFAULT_TEMPLATE, max_length: int = MAX_LENGTH,
    join: str = templates.DEFAULT_JOIN,
) -> list[dict[str, TokenSequence | str]]:
    """For every row, the four sequences of PARTS, or the reason a part cannot be scored."""
    templates.check_template(template)
    # A chat template writes its own special tokens; the text templates get the tokenizer's.
    specials = template != "chat"
    # (part, text, where the labels start in it or None for a whole text, the prompt it stands beside)
    plans: list[list[tuple[str, str, int | None, str]]] = []
    reasons: list[dict[str, str]] = []
    for row in rows:
        instruction, input, output = row["instruction"], row.get("input") or "", row["output"]
        plan: list[tuple[str, str, int | None, str]] = []
        reason: dict[str, str] = {}
        if not output.strip():
            reason = {part: "empty response" for part in PARTS}
        else:
            prompt = templates.render(template, instruction, input, tokenizer)
            plan += [("a_condition", prompt + output, len(prompt), ""), ("a_direct", output, None, prompt)]
            if not instruction.strip():
                reason = {"q_condition": "empty instruction", "q_direct": "empty instruction"}
            else:
                reverse = templates.reverse(template, output, tokenizer)
                question = templates.question(instruction, input, join)
                text = reverse + question
                # the reference labels from the last occurrence of the instruction in the text
                plan += [("q_condition", text, text.rfind(instruction), ""), ("q_direct", question, None, reverse)]
        plans.append(plan)
        reasons.append(reason)

    with_specials = _Encoded(tokenizer, True)
    in_template = with_specials if specials else _Encoded(tokenizer, False)
    for plan in plans:
        for _, text, start, prompt in plan:
            if start is None:
                with_specials.want(text)
                in_template.want(prompt)
            else:
                in_template.want(text)
                in_template.want(text[:start])
    out = []
    for plan, reason in zip(plans, reasons):
        parts: dict[str, TokenSequence | str] = dict(reason)
        for part, text, start, prompt in plan:
            if start is None:
                parts[part] = _direct(with_specials[text], len(in_template[prompt]), max_length)
            else:
                parts[part] = _span(in_template[text], len(in_template[text[:start]]), max_length)
        out.append({part: parts[part] for part in PARTS})
    return out


class _Encoded:
    """Token ids of many texts, encoded together in one tokenizer call."""

    def __init__(self, tokenizer: Any, specials: bool):
        self.tokenizer, self.specials = tokenizer, specials
        self.wanted: dict[str, None] = {}
        self.ids: dict[str, list[int]] = {}

    def want(self, text: str) -> None:
        self.wanted[text] = None

    def __getitem__(self, text: str) -> list[int]:
        if self.wanted:
            texts = list(self.wanted)
            self.wanted = {}
            encoded = self.tokenizer(texts, add_special_tokens=self.specials)["input_ids"]
            self.ids.update(zip(texts, (list(ids) for ids in encoded)))
        return self.ids[text]


def _span(full: list[int], start: int, max_length: int) -> TokenSequence | str:
    """The reference's labelled span (selection_code/data_analysis.py): the whole text is
    tokenized at once, truncated to max_length, and labelled from as many tokens as the text
    before the target has on its own. Where tokens split or merge differently at the boundary
    (SentencePiece writes `▁Word` alone and `Word` after `:`), these are the tokens the
    reference scores; training labels the same span (reflectune.training)."""
    ids = full[:max_length]
    if start >= len(ids):
        return f"prompt of {start} tokens fills max_length {max_length}"
    return TokenSequence(tuple(ids), max(start, 1))


def _direct(full: list[int], prompt_len: int, max_length: int) -> TokenSequence | str:
    # Reference rule: the text alone, with the tokenizer's special tokens, may be as long as
    # the conditional text leaves room for.
    limit = max_length - min(prompt_len, max_length) + 1
    if len(full) < 2:
        # without a BOS token the first token is only context, as in the reference code
        return "a one-token text has nothing to score: the tokenizer adds no BOS token"
    ids = full[:limit]
    if len(ids) < 2:
        return f"no token of the text left to score after truncation to {limit} tokens"
    return TokenSequence(tuple(ids), 1)


def labelled(tokenizer: Any, prompt: str, completion: str, max_length: int, specials: bool = True) -> TokenSequence | str:
    """One prompt-completion text as scoring sees it: the ids of the whole, labelled from the
    prompt's own token count (for training, where the completion carries its end token)."""
    return _span(list(tokenizer(prompt + completion, add_special_tokens=specials)["input_ids"]),
                 len(tokenizer(prompt, add_special_tokens=specials)["input_ids"]), max_length)


def score_rows(
    rows: Sequence[dict[str, str]],
    engine: StudentEngine,
    template: str = templates.DEFAULT_TEMPLATE,
    max_length: int = MAX_LENGTH,
    progress: Callable[[int, int], None] | None = None,
    join: str = templates.DEFAULT_JOIN,
    counts: dict[str, int] | None = None,
) -> list[dict[str, float | str | None]]:
    """Score columns (records.SCORES) for each row, in order. What a row's content rules out
    is NaN with a reason; an engine failure raises. `progress(advance, total)` is called with
    token counts as batches finish.

    Identical sequences (the direct instruction of orig and res, a variant that fell back to
    its original's fields) are scored once and share one result: batched kernels can give
    copies slightly different losses, and a copy must tie with its original, never beat it.
    `counts`, when given, receives how many sequences there were and how many were scored."""
    built = build_sequences(rows, engine.tokenizer, template, max_length, join)
    limit = getattr(engine, "max_sequence", None)
    for parts in built:
        for part, seq in parts.items():
            if isinstance(seq, TokenSequence) and limit is not None and len(seq.ids) > limit:
                parts[part] = (f"a sequence of {len(seq.ids)} tokens does not fit the engine's context of {limit} "
                               "tokens: raise vllm.max_model_len or lower max_length")
    todo = [(i, part, seq) for i, parts in enumerate(built) for part, seq in parts.items() if isinstance(seq, TokenSequence)]
    unique = list(dict.fromkeys(seq for _, _, seq in todo))
    total = sum(len(seq.ids) for seq in unique)
    advance = (lambda n: progress(n, total)) if progress else None
    results = dict(zip(unique, engine.token_nll(unique, advance))) if unique else {}
    if counts is not None:
        counts["sequences"] = counts.get("sequences", 0) + len(todo)
        counts["sequences_scored"] = counts.get("sequences_scored", 0) + len(unique)
    losses: list[dict[str, float]] = [{} for _ in rows]
    errors: list[dict[str, str]] = [{part: seq for part, seq in parts.items() if isinstance(seq, str)} for parts in built]
    for i, part, seq in todo:
        result = results[seq]
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


def score_table(df: pl.DataFrame, engine: StudentEngine, *args: Any, **kwargs: Any) -> pl.DataFrame:
    """`df` (instruction, input, output, ...) with the score columns added, rows in order;
    the other arguments are score_rows'."""
    rows = df.select("instruction", "input", "output").to_dicts()
    scores = score_rows(rows, engine, *args, **kwargs)
    scored = pl.DataFrame(scores, schema=SCORES) if scores else pl.DataFrame(schema=SCORES)
    return pl.concat([df.drop([c for c in SCORES if c in df.columns]), scored], how="horizontal")

