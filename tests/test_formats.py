"""Output formats as constraints (pure: no model): what the regexes admit, the JSON form,
and fields that are loops."""

import json
import re

import pytest

from reflectune import checks, formats
from reflectune.parsing import parse

INS = ("Vague: it names a topic and asks for nothing, so the answer cannot show any depth.\n[New Instruction] Compare two sorting algorithms by "
       "their time and memory. [End]\n[New Answer] Merge sort takes O(n log n) time and O(n) memory. [End]")
RES = "The answer is too short: it names the city and says nothing more.\n[Better Answer] Paris is the capital of France. [End]"


def test_teacher_regexes_admit_the_form_and_nothing_else():
    ins, res = formats.teacher_format("ins"), formats.teacher_format("res")
    assert re.fullmatch(ins.regex, INS) and re.fullmatch(res.regex, RES)
    assert not re.fullmatch(res.regex, "[Better Answer]  [End]")  # an empty field
    assert not re.fullmatch(res.regex, "The answer is far too short for the question.\n[Better Answer] unfinished")
    assert not re.fullmatch(ins.regex, INS.replace("[New Answer]", "[Better Answer]"))


@pytest.mark.parametrize("kind", ["ins", "res"])
def test_the_analysis_must_be_written_and_nothing_is_bounded_but_by_the_token_limit(kind):
    """A small teacher that skips the analysis reviews the old answer inside the answer field:
    the analysis takes at least ANALYSIS_MIN_WORDS words. No length is bounded in the form (a
    bound closes text mid-thought); the token limit cuts, and a cut field falls back."""
    fmt = formats.teacher_format(kind)
    fields = {"ins": "\n[New Instruction] Do it. [End]\n[New Answer] " + "b " * 2000 + "[End]",
              "res": "\n[Better Answer] " + "b " * 2000 + "[End]"}[kind]
    for words in (formats.ANALYSIS_MIN_WORDS, 1000):
        assert re.fullmatch(fmt.regex, " ".join(["weak"] * words) + fields), words
    assert not re.fullmatch(fmt.regex, fields.lstrip())  # no analysis
    assert not re.fullmatch(fmt.regex, " ".join(["weak"] * (formats.ANALYSIS_MIN_WORDS - 1)) + fields)


def test_the_judge_regex_puts_two_scores_first():
    fmt = formats.judge_format()
    assert re.fullmatch(fmt.regex, "8 6\nAssistant 1 is more detailed.")
    assert re.fullmatch(fmt.regex, "10 1\nx")
    for bad in ("0 5\nx", "11 2\nx", "8\nx", "8 6", "Scores: 8 6\nx"):
        assert not re.fullmatch(fmt.regex, bad), bad


def test_json_answers_map_to_the_marked_form():
    ins = formats.teacher_format("ins")
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
