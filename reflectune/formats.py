"""Output formats the teacher and the judge must follow, as constraints an engine can enforce
at decode time.

A teacher answer is an analysis followed by the marked fields:

    <analysis>
    [New Instruction] <text> [End]
    [New Answer] <text> [End]

or `<analysis>\n[Better Answer] <text> [End]`. The constraint is a regular expression (vLLM's
structured outputs, xgrammar in transformers) or, for servers that take only JSON schemas,
an object with the same fields.

The analysis is bounded in lines: at least one, at most `analysis_lines` (its share of the
token budget), each line as long as the writer makes it. The bound therefore closes the
analysis where a line ends, never mid-thought, and leaves the fields the rest of the budget;
the analysis cannot be skipped (a small teacher that skipped it went on to review the old
answer inside the answer field). The fields are not bounded but by the token limit, and a
field it cuts falls back (reflectune.checks). Every other bound tried was worse: a bound in
characters closes a field mid-word, and near it only one-character tokens fit, which is where
a small model drifts into CJK characters; a bound in words lets it glue words together or pad
with blank lines once the count is reached; no bound at all lets a 1.5B teacher spend a
256-token budget on the analysis and never reach the fields. Bounded repetitions of
characters also cost xgrammar 3-7 s to compile on CPU (over vLLM's 5 s timeout on a busy
2-core machine), repetitions of lines 0.1 s. Fields cannot contain "[" under a constraint: a
richer character class that admits "[" not followed by "End]" made xgrammar's matcher about
30x slower per token on CPU.

A grammar guarantees the form, not the content: reflectune.checks makes the checks it cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from reflectune.variants import REFLECTIONS

# Characters per token assumed when sizing text from a token budget: English prose runs at
# about 4; 3.5 leaves room for code and numbers.
CHARS_PER_TOKEN = 3.5
# the analysis's share of the token budget, in lines of about TOKENS_PER_LINE tokens
ANALYSIS_SHARE = {"ins": 0.35, "res": 0.3}
TOKENS_PER_LINE = 16
MIN_ANALYSIS_LINES = 4
FIELD_TEXT = r"[^\[\s][^\[]*"


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
FIELDS = REFLECTIONS


def teacher_format(kind: str, max_new_tokens: int) -> OutputFormat:
    """The format of an instruction reflection (`ins`) or a response reflection (`res`, also
    used for `ins_res`) for a request of `max_new_tokens`."""
    fields = FIELDS[kind]
    regex = r"[^\[\s][^\[\n]*\n(?:[^\[\n]*\n){0,%d}" % (analysis_lines(kind, max_new_tokens) - 1)
    for i, name in enumerate(fields):
        regex += (r"\n" if i else "") + r"\[%s\] " % MARKERS[name] + FIELD_TEXT + r" ?\[End\]"
    schema = {"type": "object", "additionalProperties": False, "required": ["analysis", *fields],
              "properties": {"analysis": {"type": "string", "minLength": 1,
                                          "maxLength": int(ANALYSIS_SHARE[kind] * max_new_tokens * CHARS_PER_TOKEN)},
                             **{name: {"type": "string", "minLength": 1} for name in fields}}}
    return OutputFormat(f"reflection_{kind}", regex, schema, fields)


def analysis_lines(kind: str, max_new_tokens: int) -> int:
    """The most lines (blank ones included) the analysis may take: its share of the budget at
    TOKENS_PER_LINE, and never under MIN_ANALYSIS_LINES."""
    return max(MIN_ANALYSIS_LINES, int(ANALYSIS_SHARE[kind] * max_new_tokens / TOKENS_PER_LINE))


def fit(fmt: OutputFormat | None, max_new_tokens: int) -> OutputFormat | None:
    """`fmt` resized for a request whose budget the engine had to lower (a long prompt leaves
    less of the context): the analysis must still leave the fields room."""
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


VERDICTS = ("Yes", "No")


def verdict_format() -> OutputFormat:
    """A verification's answer (teacher.verify): one word, Yes or No."""
    schema = {"type": "object", "additionalProperties": False, "required": ["verdict"],
              "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}}}
    return OutputFormat("verdict", "(%s)" % "|".join(VERDICTS), schema, ("verdict",))


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
    if fmt.name == "verdict":
        return obj["verdict"] if obj.get("verdict") in VERDICTS else None
    parts = [str(obj.get("analysis", ""))]
    for name in fmt.fields:
        if not isinstance(obj.get(name), str):
            return None
        parts.append(f"[{MARKERS[name]}] {obj[name]} [End]")
    return "\n".join(parts)
