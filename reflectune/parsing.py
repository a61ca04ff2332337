"""Parsing teacher output: the marked fields, tolerant of what models really write.

A field is the text after its marker (`[New Instruction]`, `New Instruction:`, `**New
Instruction:**`, any case) up to `[End]`, the next marker, or the end of the text. When a
marker occurs several times (a model restating the format, then answering), the last usable
candidate wins: the prompt asks for the fields at the end. A field is unusable when it is
missing, empty, or echoes the template ("your instruction", "your answer", "N/A"). An answer
cut off by the token limit (it runs to the end of a generation that stopped for length) is
kept as the reference keeps it, and listed in `cut`; an instruction needs its closing marker,
as in the reference. A usable field that is mostly repetition, and a placeholder closed like
a field, are `degenerate`: the form, but no use as data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from reflectune.checks import degenerate

_NAMES = {
    "new_instruction": r"new\s+instruction",
    "new_answer": r"new\s+answer",
    "better_answer": r"better\s+answer",
}
# "[New Answer]", "[New Answer]:", "New Answer:", "**New Answer:**", "### New Answer:"
_MARKER = {
    key: re.compile(
        rf"\[\s*{name}\s*\]\s*:?|(?:^|(?<=\n))[ \t]*(?:#+\s*|\*\*)?{name}\s*(?:\*\*\s*)?:(?:\s*\*\*)?",
        re.IGNORECASE,
    )
    for key, name in _NAMES.items()
}
_END = re.compile(r"\[\s*/?\s*end\s*\]", re.IGNORECASE)
_ECHOES = {"your instruction", "your answer", "your new instruction", "your new answer", "your better answer",
           "n/a", "na", "none", "instruction", "answer", "..."}


@dataclass
class Parsed:
    fields: dict[str, str] = field(default_factory=dict)  # usable fields only
    problems: dict[str, str] = field(default_factory=dict)  # field -> why it is unusable
    degenerate: set[str] = field(default_factory=set)  # fields present and closed, but loops
    cut: set[str] = field(default_factory=set)  # usable fields that ran into the token limit
    # field -> the parse status that says why it is unusable, where it is not a missing form:
    # cut (the token limit came first), and the content checks' (reflection.screen)
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def well_formed(self) -> bool:
        """Every wanted field present and closed (some may be degenerate)."""
        return set(self.problems) <= self.degenerate


def parse(text: str, wanted: tuple[str, ...], cut_off: bool = False) -> Parsed:
    """Extract `wanted` fields (keys of _NAMES). `cut_off`: the generation stopped at its
    token limit, so a field running to the end of the text is incomplete."""
    spans = _marker_spans(text or "")
    out = Parsed()
    for name in wanted:
        candidates = [s for s in spans if s[2] == name]
        if not candidates:
            if cut_off:  # the analysis (or an earlier field) ran to the token limit
                out.problems[name] = f"cut off at the token limit before its [{_title(name)}] marker"
                out.flags[name] = "cut"
            else:
                out.problems[name] = f"no [{_title(name)}] marker"
            continue
        reason, echoed = "", False
        for start, end, _ in reversed(candidates):
            value, ran_to_end = _field_text(text, end, spans)
            cut = ran_to_end and cut_off
            reason = _unusable(value, cut and name == "new_instruction")
            # the format line's placeholder, closed like a field: the form without content
            echoed = echoed or (reason.startswith("echoes") and not ran_to_end)
            if not reason:
                loop = degenerate(value)
                if loop:
                    out.problems[name] = f"degenerate, {loop}"
                    out.degenerate.add(name)
                else:
                    out.fields[name] = value
                    if cut:
                        out.cut.add(name)
                break
        else:
            out.problems[name] = reason
            if echoed:
                out.problems[name] = f"degenerate, {reason}"
                out.degenerate.add(name)
    return out


def _marker_spans(text: str) -> list[tuple[int, int, str]]:
    spans = [(m.start(), m.end(), name) for name, rx in _MARKER.items() for m in rx.finditer(text)]
    return sorted(spans)


def _field_text(text: str, start: int, spans: list[tuple[int, int, str]]) -> tuple[str, bool]:
    stop = len(text)
    for s, _, _ in spans:
        if s >= start:
            stop = s
            break
    end = _END.search(text, start, stop)
    if end:
        stop = end.start()
    ran_to_end = stop == len(text) and not end
    return _clean(text[start:stop]), ran_to_end


# the format line's placeholder, copied after a real value ("Name a fruit. your instruction")
_TRAILING_ECHO = re.compile(r"\s*\byour\s+(?:new\s+|better\s+)?(?:instruction|answer)[\s.]*$", re.IGNORECASE)


def _clean(value: str) -> str:
    value = value.strip()
    # a marker's own decoration left around the value: "** text **", quotes around the whole
    value = value.strip("*").strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    stripped = _TRAILING_ECHO.sub("", value).strip()
    return stripped or value


def _unusable(value: str, cut_off: bool) -> str:
    if not value:
        return "empty"
    normal = re.sub(r"[\s\[\]().:*\"'`]+", " ", value.lower()).strip()
    if normal in _ECHOES or (len(normal) < 40 and normal.startswith(("your instruction", "your answer"))):
        return f"echoes the template ({value[:40]!r})"
    if cut_off:
        return "cut off at the token limit"
    return ""


def _title(name: str) -> str:
    return name.replace("_", " ").title()
