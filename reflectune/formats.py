"""Output formats the teacher and the judge must follow, as constraints an engine can enforce
at decode time, and the checks a grammar cannot make.

A teacher answer is a bounded free-text analysis followed by the marked fields:

    <analysis> [New Instruction] <text> [End]
    [New Answer] <text> [End]

or `<analysis> [Better Answer] <text> [End]`. The constraint is a regular expression (vLLM's
structured outputs, xgrammar in transformers) or, for servers that take only JSON schemas,
an object with the same fields. Lengths are bounded in characters, sized from the token
budget so the closing markers always fit: the analysis can never crowd the fields out.
Fields cannot contain "[" under a constraint: a richer character class that admits "[" not
followed by "End]" made xgrammar's matcher about 30x slower per token on CPU.

A grammar guarantees the form, not the content: reflectune.checks makes the checks it cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from reflectune.variants import REFLECTIONS

# Characters per token assumed when sizing fields from a token budget: English prose runs at
# about 4; 3.5 leaves room for code and numbers.
CHARS_PER_TOKEN = 3.5
FIELD_TEXT = r"[^\[\s][^\[]{0,%d}"


@dataclass(frozen=True)
class OutputFormat:
    """One generation's required form: a regex over the whole text, the equivalent JSON schema,
    and the fields it carries, in order."""

    name: str
    regex: str
    json_schema: dict
    fields: tuple[str, ...]

    def response_format(self) -> dict:
        """The OpenAI `response_format` for servers that take JSON schemas."""
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema, "strict": True}}


MARKERS = {"new_instruction": "New Instruction", "new_answer": "New Answer", "better_answer": "Better Answer"}
# share of the character budget: (analysis, each field in order)
SHARES = {"ins": (0.25, (0.2, 0.5)), "res": (0.3, (0.65,))}
FIELDS = REFLECTIONS


def teacher_format(kind: str, max_new_tokens: int) -> OutputFormat:
    """The format of an instruction reflection (`ins`) or a response reflection (`res`, also
    used for `ins_res`) that fits within `max_new_tokens`."""
    budget = int(CHARS_PER_TOKEN * max_new_tokens)
    analysis_share, field_shares = SHARES[kind]
    analysis = max(0, int(analysis_share * budget))
    sizes = [max(1, int(share * budget)) for share in field_shares]
    fields = FIELDS[kind]
    regex = r"[^\[]{0,%d}" % analysis
    for i, (name, size) in enumerate(zip(fields, sizes)):
        regex += (r"\n" if i else "") + r"\[%s\] " % MARKERS[name] + FIELD_TEXT % (size - 1) + r" ?\[End\]"
    schema = {"type": "object", "additionalProperties": False, "required": ["analysis", *fields],
              "properties": {"analysis": {"type": "string", "maxLength": analysis},
                             **{name: {"type": "string", "minLength": 1, "maxLength": size}
                                for name, size in zip(fields, sizes)}}}
    return OutputFormat(f"reflection_{kind}", regex, schema, fields)


def bounds(fmt: OutputFormat) -> dict[str, int]:
    """Each field's length bound in characters: a field this long was closed by the form."""
    props = fmt.json_schema["properties"]
    return {name: props[name]["maxLength"] for name in fmt.fields}


def fit(fmt: OutputFormat | None, max_new_tokens: int) -> OutputFormat | None:
    """`fmt` resized for a request whose budget the engine had to lower (a long prompt
    leaves less of the context): the fields must still close within it."""
    if fmt is None or not fmt.name.startswith("reflection_"):
        return fmt
    return teacher_format(fmt.name.removeprefix("reflection_"), max_new_tokens)


def judge_format(explanation_tokens: int = 24) -> OutputFormat:
    """The judge's answer: a first line of exactly two scores 1-10, then a short explanation."""
    score = r"(10|[1-9])"
    explanation = int(CHARS_PER_TOKEN * explanation_tokens)
    regex = score + " " + score + r"\n[^\[]{1,%d}" % explanation
    schema = {"type": "object", "additionalProperties": False, "required": ["score_1", "score_2", "explanation"],
              "properties": {"score_1": {"type": "integer", "minimum": 1, "maximum": 10},
                             "score_2": {"type": "integer", "minimum": 1, "maximum": 10},
                             "explanation": {"type": "string", "maxLength": explanation}}}
    return OutputFormat("judgement", regex, schema, ("score_1", "score_2"))


def from_json(text: str, fmt: OutputFormat) -> str | None:
    """A JSON answer (from a json_schema server) rewritten in the marked form the parser reads,
    or None when the text is not such an object."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    if fmt.name == "judgement":
        if not all(isinstance(obj.get(k), int | float) for k in ("score_1", "score_2")):
            return None
        return f"{obj['score_1']} {obj['score_2']}\n{obj.get('explanation', '')}"
    parts = [str(obj.get("analysis", ""))]
    for name in fmt.fields:
        if not isinstance(obj.get(name), str):
            return None
        parts.append(f"[{MARKERS[name]}] {obj[name]} [End]")
    return "\n".join(parts)
