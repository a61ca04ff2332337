"""Teacher reflection: from original pairs to the variants ins, res and ins_res (docs/method.md).

Phase 1 asks the teacher for the instruction reflection (ins) and the response reflection of
the original (res) together; phase 2 asks for the response reflection of each new pair
(ins_res). Where the engine can, the output format is enforced at decode time
(reflectune.formats); the lineage records, per attempt, whether it was. Every parsed field is
then screened for what a form cannot guarantee (`screen`, reflectune.checks): a field cut by
the token limit, a loop or a copy, a new instruction that
is a piece of the analysis, an answer that reviews an answer, a switch into a script nobody
asked for. A variant is usable (`ok`) only when every one of its fields passes; otherwise it
gets one more try with different sampling (the reference retries only rows where nothing
parsed) and, still unusable, falls back whole to its base pair with the reason as its parse
status, so it ties with that pair in selection and is never chosen. With `verify`, the teacher
is then asked of each usable variant whether it is a complete answer with no commentary about
another answer (prompts.verification, one constrained word); a No falls back the same way with
status `verify`. Every row keeps the raw teacher text of every attempt (and of its
verification), its parse status and token usage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import polars as pl

from reflectune import checks, formats, parsing, prompts
from reflectune.records import RECORD, VARIANT, VARIANTS
from reflectune.variants import BY_NAME

KINDS = ("instruction", "response", "both")
CONSTRAINED = ("auto", "on", "off")
# new tokens a teacher request may write, as the reference allows (teacher.max_new_tokens)
MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = MAX_NEW_TOKENS
    seed: int | None = None
    repetition_penalty: float = 1.0
    # auto: enforce the output format where the engine can; on: fail where it cannot; off: never
    constrained: str = "off"


@dataclass
class Generation:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length"
    error: str | None = None  # the request failed for this chat only
    constrained: str = "none"  # how the format was enforced: regex, json_schema, tool_use or none


# part of every request key: a change to what a key means starts a new request journal.
# 2: who answers is the engine's `identity` (no host or port); 1 had its `teacher_id`
REQUEST_KEY_VERSION = 2


def request_key(identity: str, chat: Sequence[dict[str, str]], sampling: Sampling, fmt: Any,
                version: int = REQUEST_KEY_VERSION) -> str:
    """What makes a teacher request the same request: who answers (the engine's `identity`),
    what is asked, how it is sampled, and the output form required (None where none is
    enforced). The request journal keeps answers by it; a batch API names its lines by it.
    `version` 1 gives the keys of journals written before version 2 (with the `teacher_id`)."""
    payload = [version, identity, list(chat), asdict(sampling), fmt.regex if fmt is not None else None]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


# the error of a generation that was never asked for: the budget refused it (reflectune.journal)
NOT_SENT = "not sent: the teacher budget would be passed"


class TeacherEngine(Protocol):
    """What reflection needs from a teacher: chats in, one generation per chat out, in order.
    `formats` (one per chat, or None) are enforced at decode time where the engine can and
    `sampling.constrained` allows; each Generation says how. A request that fails on its own
    returns a Generation with `error`; a failure that dooms the whole call raises.

    `admit(i)` is asked before chat i is sent (per request, or per batch for a batched
    engine): once it says no, nothing more is sent and the chats left get `error=NOT_SENT`.
    `done(i, generation)` is called as each generation returns, so it can be kept at once.
    `teacher_id` names the teacher in records (an API's with the host it was reached at); an
    engine whose records name more than who answers also has `identity`, what request keys
    know it by (an API's protocol, model and well-known provider: openai_compat.identity).
    An engine that submits batches (`submits_batches`) also takes the requests' `keys`, a
    `ledger` of its batches and a `tally`, and may pass `note=` (its batches' lines done and
    failed) to `progress`."""

    teacher_id: str

    def generate(self, chats: Sequence[prompts.Messages], sampling: Sampling,
                 progress: Callable[[int, int], None] | None = None,
                 formats: Sequence[formats.OutputFormat | None] | None = None, *,
                 admit: Callable[[int], bool] | None = None,
                 done: Callable[[int, Generation], None] | None = None) -> list[Generation]: ...


@dataclass
class _Job:
    """One variant of one sample on its way through the teacher."""

    base: dict[str, str]  # the pair reflected on: sample_id, source_index, instruction, input, output
    variant: str
    raw: list[str]
    constrained: list[str] = field(default_factory=list)  # per attempt
    prompt_tokens: int = 0
    completion_tokens: int = 0
    result: dict | None = None  # the finished variant row


def reflect(
    records: pl.DataFrame,
    teacher: TeacherEngine,
    kind: str = "both",
    sampling: Sampling = Sampling(),
    retry_sampling: Sampling | None = None,
    progress: Callable[[int, int], None] | None = None,
    plan: Callable[[int], None] | None = None,
    verify: bool = False,
) -> pl.DataFrame:
    """Variant rows (records.VARIANT) for `records` (records.RECORD), ordered by source and
    variant. `progress(generations, new_tokens)` as generations are written; `plan(total)` with
    the generations planned, again whenever retries or verifications add to them."""
    if kind not in KINDS:
        raise ValueError(f"unknown reflection kind '{kind}': choose one of {', '.join(KINDS)}")
    if sampling.constrained not in CONSTRAINED:
        raise ValueError(f"unknown constrained setting '{sampling.constrained}': choose one of {', '.join(CONSTRAINED)}")
    retry_sampling = retry_sampling or retry_of(sampling)
    bases = records.select(list(RECORD)).to_dicts()

    phase1 = []
    if kind in ("instruction", "both"):
        phase1 += [_Job(b, "ins", []) for b in bases]
    if kind in ("response", "both"):
        phase1 += [_Job(b, "res", []) for b in bases]
    planned = [len(phase1) + (len(bases) if kind == "both" else 0)]

    def more(n: int) -> None:
        planned[0] += n
        if plan:
            plan(planned[0])

    more(0)
    _run(phase1, teacher, sampling, retry_sampling, progress, more)
    if verify:  # before phase 2: an ins_res reflects on what ins turned out to be
        _verify(phase1, teacher, sampling, progress, more)

    phase2 = []
    if kind == "both":
        phase2 = [_Job(_as_base(job.result), "ins_res", []) for job in phase1 if job.variant == "ins"]
        _run(phase2, teacher, sampling, retry_sampling, progress, more)
        if verify:
            _verify(phase2, teacher, sampling, progress, more)

    rows = [job.result for job in phase1 + phase2]
    rows.sort(key=lambda r: (r["source_index"], VARIANTS.index(r["variant"])))
    return pl.DataFrame(rows, schema=VARIANT) if rows else pl.DataFrame(schema=VARIANT)


# The retry of an output that did not parse samples where the first attempt was greedy: the
# same sampling would write the same text again.
RETRY_TEMPERATURE, RETRY_TOP_P = 0.7, 0.95


def retry_of(sampling: Sampling, temperature: float = RETRY_TEMPERATURE) -> Sampling:
    from dataclasses import replace

    return replace(sampling, temperature=temperature, top_p=RETRY_TOP_P, seed=(sampling.seed or 0) + 1)


# the fewest new tokens worth asking for: below it the marked fields cannot close
MIN_NEW_TOKENS = 16


def new_tokens(prompt_tokens: int, wanted: int, context: int | None) -> int | str:
    """A request's token limit as the reference sets it, min(wanted, context - prompt), or why
    the prompt leaves no room."""
    if context is None:
        return wanted
    room = context - prompt_tokens
    if room < min(wanted, MIN_NEW_TOKENS):
        return f"prompt of {prompt_tokens} tokens leaves {max(room, 0)} of the teacher's context of {context} tokens"
    return min(wanted, room)


def _as_base(row: dict) -> dict[str, str]:
    return {name: row[name] for name in RECORD}


def _run(jobs: list[_Job], teacher: TeacherEngine, sampling: Sampling, retry: Sampling,
         progress: Callable[[int, int], None] | None, more: Callable[[int], None]) -> None:
    pending = jobs
    for attempt, params in enumerate((sampling, retry)):
        if not pending:
            return
        if attempt:  # the retries were not in the plan
            more(len(pending))
        chats = [_chat(job, params.max_new_tokens) for job in pending]
        wanted = None
        if params.constrained != "off":
            wanted = [formats.teacher_format(BY_NAME[job.variant].reflection, params.max_new_tokens)
                      for job in pending]
        generations = teacher.generate(chats, params, progress, wanted)
        failed = []
        for job, gen in zip(pending, generations):
            job.raw.append(gen.text if gen.error is None else f"[request failed: {gen.error}]")
            job.constrained.append(gen.constrained)
            job.prompt_tokens += gen.prompt_tokens
            job.completion_tokens += gen.completion_tokens
            parsed = _parse(job, gen)
            screen(job.variant, job.base, parsed)
            last = attempt == 1
            if not _usable(job, parsed) and not last:
                failed.append(job)
            else:
                job.result = _finish(job, parsed, teacher.teacher_id)
        pending = failed


# new tokens a verification may write: one word, or a JSON object of one word for a server that
# takes only JSON schemas (7 tokens compact, more as a server spaces it); a grammar stops it at the end
VERIFY_TOKENS = 24
VERIFY_MARK = "[verify] "  # how a verification's answer is kept among the variant's raw texts


def _verify(jobs: list[_Job], teacher: TeacherEngine, sampling: Sampling,
            progress: Callable[[int, int], None] | None, more: Callable[[int], None]) -> None:
    """Verify each usable variant (`verification`); a variant not answered Yes falls back whole
    to its base pair with status `verify`. The answers are kept among the variant's raw texts
    and count in its tokens."""
    todo = [job for job in jobs if job.result["parse_status"] == "ok"]
    if not todo:
        return
    more(len(todo))
    for job, gen in zip(todo, verification([job.result for job in todo], teacher, sampling, progress)):
        row = job.result
        row["raw_text"].append(VERIFY_MARK + (gen.text if gen.error is None else f"[request failed: {gen.error}]"))
        row["constrained"].append(gen.constrained)
        row["prompt_tokens"] += gen.prompt_tokens
        row["completion_tokens"] += gen.completion_tokens
        said = verdict(gen)
        if said == "yes":
            continue
        why = (f"the verification failed: {gen.error}" if gen.error is not None else
               f"the teacher answered {gen.text.strip()[:40]!r} to whether it is a complete answer with no "
               "commentary about another answer" if said == "no" else
               f"the verification's answer {gen.text.strip()[:40]!r} is neither Yes nor No")
        row.update({name: job.base[name] for name in ("instruction", "input", "output")},
                   parse_status="verify", parse_detail=why)


def verification(rows: Sequence[dict], teacher: TeacherEngine, sampling: Sampling,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Ask the teacher of each pair (instruction, input, output), greedily and in one word held
    to Yes|No where the engine can (`sampling.constrained`), whether the output is a complete
    answer with no commentary about another answer. Through `teacher` as given: behind the
    journal and the budget on the pipeline's path."""
    from dataclasses import replace

    params = replace(sampling, temperature=0.0, top_p=1.0, max_new_tokens=VERIFY_TOKENS, repetition_penalty=1.0)
    chats = [prompts.verification(r["instruction"], r["input"], r["output"]) for r in rows]
    wanted = [formats.verdict_format()] * len(chats) if params.constrained != "off" else None
    return teacher.generate(chats, params, progress, wanted)


def verdict(gen: Generation) -> str | None:
    """"yes" or "no" as a verification's first word says (a JSON-schema server's object read
    as its verdict), None when it says neither or the request failed."""
    if gen.error is not None:
        return None
    text = gen.text
    if gen.constrained in ("json_schema", "tool_use"):
        text = formats.from_json(text, formats.verdict_format()) or text
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    if words[:1] == ["verdict"]:  # a JSON object that did not parse (cut, or not held to the schema)
        words = words[1:]
    return words[0] if words and words[0] in ("yes", "no") else None


def _usable(job: _Job, parsed: parsing.Parsed) -> bool:
    """Whether an attempt gave the variant every field it needs; screened (see `screen`), an
    attempt has all of its fields or none, and one with none is asked again."""
    return set(BY_NAME[job.variant].fields) <= set(parsed.fields)


def screen(variant: str, base: dict[str, str], parsed: parsing.Parsed) -> None:
    """Make unusable the parsed fields whose content is not what the field promises
    (reflectune.checks): cut by the token limit or stopping where its content should begin; a
    copy or a piece of the text it replaces, or a run past its own end; a new instruction that
    is a piece of the analysis; an answer that reviews an answer; letters of a script the pair
    neither has nor asks for. Each such field gets its parse status in `parsed.flags`. A variant stands on all of its fields: when one is
    unusable, the others are dropped with it, so the variant falls back whole to its base
    pair and selection can never choose it."""
    fields = parsed.fields
    context = (base["instruction"], base["input"], base["output"])
    for name in BY_NAME[variant].fields:
        if name not in fields:
            continue
        value = fields[name]
        found = [("cut", "cut off at the token limit" if name in parsed.cut else checks.unfinished(value))]
        found.append(("degenerate", _copied(name, value, base, fields)))
        if name == "new_instruction":
            found.append(("fragment", checks.fragment(value)))
            found.append(("script", checks.foreign_script(value, *context)))
        else:
            # a new answer answers the new instruction, a better answer its base pair's
            asked = fields.get("new_instruction", base["instruction"])
            found.append(("review", checks.review(value, asked, "" if name == "new_answer" else base["input"])))
            found.append(("script", checks.foreign_script(value, *context, asked)))
        status, why = next(((s, w) for s, w in found if w), (None, None))
        if status:
            del fields[name]
            parsed.problems[name] = why
            parsed.flags[name] = status
            if status == "degenerate":
                parsed.degenerate.add(name)
    parsed.cut &= set(fields)
    if fields and set(fields) != set(BY_NAME[variant].fields):
        unusable = next(n for n in BY_NAME[variant].fields if n not in fields)
        for name in list(fields):
            del fields[name]
            parsed.problems[name] = f"dropped with the unusable {_label(unusable)}: the variant is its base pair"


def _copied(name: str, value: str, base: dict[str, str], fields: dict[str, str]) -> str | None:
    """Why a field is no rewrite though present and closed: a copy or a piece of what it
    replaces, an answer that repeats its instruction, a run past its own end."""
    replaces = base["instruction"] if name == "new_instruction" else base["output"]
    if _same(value, replaces):
        return "repeats the original unchanged"
    if _within(value, replaces):
        return "keeps only a piece of the original"
    if name != "new_instruction" and _same(value, fields.get("new_instruction", base["instruction"])):
        return "repeats its instruction"
    return checks.overrun(value)


def _label(name: str) -> str:
    return name.replace("_", " ")


def _chat(job: _Job, max_new_tokens: int) -> prompts.Messages:
    b = job.base
    if BY_NAME[job.variant].reflection == "ins":
        return prompts.instruction_reflection(b["instruction"], b["input"], b["output"], max_new_tokens)
    return prompts.response_reflection(b["instruction"], b["input"], b["output"], max_new_tokens)


def read_text(variant: str, base: dict, text: str, cut_off: bool = False) -> dict:
    """The variant row one teacher text makes of `base` (a record: sample_id, source_index,
    instruction, input, output), as `reflect` makes it: parsed, screened and finished. For
    reading a text again (tests, the quality benchmark) without a teacher."""
    parsed = parsing.parse(text, BY_NAME[variant].fields, cut_off=cut_off)
    screen(variant, base, parsed)
    return _finish(_Job(dict(base), variant, [text]), parsed, "")


def _parse(job: _Job, gen: Generation) -> parsing.Parsed:
    wanted = BY_NAME[job.variant].fields
    if gen.error is not None:
        return parsing.Parsed(problems={name: f"request failed: {gen.error}" for name in wanted})
    text = gen.text
    if gen.constrained in ("json_schema", "tool_use"):  # the fields came back as JSON: read them as marked text
        text = formats.from_json(text, formats.teacher_format(BY_NAME[job.variant].reflection, 1)) or text
    return parsing.parse(text, wanted, cut_off=gen.finish_reason == "length")


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _within(part: str, whole: str) -> bool:
    """`part` is a piece of `whole` (a line of a poem it was to improve on), not a rewrite."""
    return " ".join(part.lower().split()) in " ".join(whole.lower().split())


def _finish(job: _Job, parsed: parsing.Parsed, teacher_id: str) -> dict:
    b = job.base
    # a field that repeats what it was to replace is present and closed but no rewrite:
    # degenerate, like a loop (screen has already made it so on the pipeline's path)
    for name, original in (("new_instruction", b["instruction"]), ("better_answer", b["output"])):
        if name in parsed.fields and _same(parsed.fields[name], original):
            del parsed.fields[name]
            parsed.problems[name] = "degenerate, repeats the original unchanged"
            parsed.degenerate.add(name)
    if job.variant == "ins":
        instruction = parsed.fields.get("new_instruction")
        output = parsed.fields.get("new_answer")
        if output is None and instruction is not None:
            instruction = None
            del parsed.fields["new_instruction"]
            parsed.problems["new_instruction"] = "dropped with the unusable new answer: the variant is the original pair"
        fields = {
            "instruction": instruction if instruction is not None else b["instruction"],
            # the new instruction is self-contained; a fallen-back one still needs its input
            "input": "" if instruction is not None else b["input"],
            "output": output if output is not None else b["output"],
        }
    else:
        output = parsed.fields.get("better_answer")
        fields = {"instruction": b["instruction"], "input": b["input"], "output": output if output is not None else b["output"]}
    version = BY_NAME[job.variant].prompt_version
    for name in parsed.cut:
        parsed.problems[name] = "cut off at the token limit, kept as written"
    flagged = [parsed.flags[n] for n in BY_NAME[job.variant].fields if n in parsed.flags]
    if not parsed.problems:
        status = "ok"
    elif flagged:  # a content check made the variant unusable: its own status
        status = flagged[0]
    elif not parsed.fields:
        # nothing usable: the original's fields; loops are told apart from a missing form
        status = "degenerate" if parsed.degenerate else "fallback"
    elif parsed.well_formed and not parsed.cut:
        status = "degenerate"
    else:
        status = "partial"
    return {
        "sample_id": b["sample_id"],
        "source_index": b["source_index"],
        "variant": job.variant,
        **fields,
        "raw_text": job.raw,
        "constrained": job.constrained,
        "parse_status": status,
        "parse_detail": "; ".join(f"{k}: {v}" for k, v in parsed.problems.items()) or None,
        "prompt_version": version,
        "teacher": teacher_id,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
    }
