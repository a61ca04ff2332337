"""Output formats as constraints (pure: no model): what the regexes admit, the JSON form,
and fields that are loops."""

import json
import re

import pytest

from reflectune import checks, formats
from reflectune.parsing import parse

INS = ("Vague: it names a topic and asks for nothing.\n[New Instruction] Compare two sorting algorithms by "
       "their time and memory. [End]\n[New Answer] Merge sort takes O(n log n) time and O(n) memory. [End]")
RES = "The answer is too short.\n[Better Answer] Paris is the capital of France. [End]"


def test_teacher_regexes_admit_the_form_and_nothing_else():
    ins, res = formats.teacher_format("ins", 256), formats.teacher_format("res", 256)
    assert re.fullmatch(ins.regex, INS) and re.fullmatch(res.regex, RES)
    assert not re.fullmatch(res.regex, "[Better Answer]  [End]")  # an empty field
    assert not re.fullmatch(res.regex, "The answer is far too short.\n[Better Answer] unfinished")  # not closed
    assert not re.fullmatch(ins.regex, INS.replace("[New Answer]", "[Better Answer]"))


@pytest.mark.parametrize("kind,tokens", [("ins", 64), ("ins", 1024), ("res", 256), ("res", 2048)])
def test_the_analysis_ends_at_a_line_and_leaves_the_fields_room(kind, tokens):
    """A small teacher that skips the analysis reviews the old answer inside the answer field:
    the analysis takes a line at least, and at most its share of the budget in lines, so it
    ends where a line ends and the fields (bounded only by the token limit) have the rest."""
    fmt = formats.teacher_format(kind, tokens)
    most = formats.analysis_lines(kind, tokens)
    assert most == max(formats.MIN_ANALYSIS_LINES, int(formats.ANALYSIS_SHARE[kind] * tokens / formats.TOKENS_PER_LINE))
    fields = {"ins": "[New Instruction] Do it. [End]\n[New Answer] " + "b " * 3000 + "[End]",
              "res": "[Better Answer] " + "b " * 3000 + "[End]"}[kind]
    line = "The answer is weak: " + "it says little " * 20 + "\n"
    for lines in (1, most):
        assert re.fullmatch(fmt.regex, line * lines + fields), lines
    assert re.fullmatch(fmt.regex, line + "\n" * (most - 1) + fields)  # blank lines count
    assert not re.fullmatch(fmt.regex, line * (most + 1) + fields)
    assert not re.fullmatch(fmt.regex, fields)  # no analysis
    assert not re.fullmatch(fmt.regex, "The answer is weak. " + fields)  # the marker starts a line
    assert formats.fit(fmt, tokens // 2) == formats.teacher_format(kind, tokens // 2)


def test_the_judge_regex_puts_two_scores_first():
    fmt = formats.judge_format()
    assert re.fullmatch(fmt.regex, "8 6\nAssistant 1 is more detailed.")
    assert re.fullmatch(fmt.regex, "10 1\nx")
    for bad in ("0 5\nx", "11 2\nx", "8\nx", "8 6", "Scores: 8 6\nx"):
        assert not re.fullmatch(fmt.regex, bad), bad


def test_json_answers_map_to_the_marked_form():
    ins = formats.teacher_format("ins", 256)
    text = json.dumps({"analysis": "weak", "new_instruction": "Name three moons of Jupiter.",
                       "new_answer": "Io, Europa and Ganymede."})
    parsed = parse(formats.from_json(text, ins), ins.fields)
    assert parsed.fields == {"new_instruction": "Name three moons of Jupiter.", "new_answer": "Io, Europa and Ganymede."}
    assert formats.from_json('{"analysis": "x"}', ins) is None and formats.from_json("not json", ins) is None
    judge = formats.judge_format()
    assert formats.from_json('{"score_1": 7, "score_2": 9, "explanation": "B is fuller."}', judge).startswith("7 9\n")
    assert ins.response_format()["json_schema"]["schema"]["required"] == ["analysis", "new_instruction", "new_answer"]


def test_loops_are_degenerate_and_prose_is_not():
    loop = "The answer is weak for this task. " * 20
    assert "mostly repetition" in checks.degenerate(loop)
    assert "8-character runs" in checks.degenerate("=" * 80)
    prose = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
             "chloroplasts, where chlorophyll absorbs mostly red and blue light.")
    assert checks.degenerate(prose) is None and checks.degenerate("Yes.") is None


def test_a_degenerate_field_is_well_formed_but_unusable():
    text = "Weak.\n[Better Answer] " + "It is not helpful enough. " * 12 + "[End]"
    parsed = parse(text, ("better_answer",))
    assert parsed.well_formed and "better_answer" in parsed.degenerate and not parsed.fields
    assert parsed.problems["better_answer"].startswith("degenerate, mostly repetition")
    assert not parse("no markers at all", ("better_answer",)).well_formed
