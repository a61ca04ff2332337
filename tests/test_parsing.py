"""Parsing a corpus of realistic teacher outputs."""

import pytest

from reflectune.parsing import parse

INS = ("new_instruction", "new_answer")
RES = ("better_answer",)

WELL_FORMED = """1. The instruction is vague: it names a topic but asks for nothing specific.
The answer is short and lacks detail.
2. [New Instruction] Compare the light-dependent and light-independent reactions of photosynthesis, naming where each happens in the chloroplast. [End]
3. [New Answer] The light-dependent reactions happen in the thylakoid membranes...
The Calvin cycle happens in the stroma. [End]"""

MISSING_END = """[New Instruction] Explain how a binary search works and give its time complexity.
[New Answer] Binary search repeatedly halves a sorted range: compare the middle element with the target, then keep the half that can still contain it. It takes O(log n) comparisons."""

UNBRACKETED = """Analysis: the instruction is too broad.

New Instruction: List three renewable energy sources and one drawback of each.

New Answer: Solar (intermittent), wind (noise and intermittency), hydro (habitat disruption)."""

BOLD = """**New Instruction:** Write a limerick about a cat who cannot find its food bowl.

**New Answer:** A tabby who lived by the sea..."""

ECHOED = """[New Instruction] your instruction [End]
[New Answer] your answer [End]"""

RESTATED_THEN_ANSWERED = """I will answer in the format [New Instruction] your instruction [End] [New Answer] your answer [End].

[New Instruction] Describe the causes of the French Revolution in three paragraphs. [End]
[New Answer] Fiscal crisis, social inequality and Enlightenment ideas combined... [End]"""

OTHER_ORDER = """[New Answer] Paris has been the capital of France since 987. [End]
[New Instruction] Since when has Paris been the capital of France, and why was it chosen? [End]"""

CUT_OFF = """[New Instruction] Explain the water cycle in detail for a ten-year-old. [End]
[New Answer] Water evaporates from the oceans when the sun warms it, then"""


def test_well_formed():
    p = parse(WELL_FORMED, INS)
    assert p.problems == {}
    assert p.fields["new_instruction"].startswith("Compare the light-dependent")
    assert p.fields["new_answer"].endswith("The Calvin cycle happens in the stroma.")


def test_missing_end_runs_to_the_next_marker_or_the_end():
    p = parse(MISSING_END, INS)
    assert p.fields["new_instruction"] == "Explain how a binary search works and give its time complexity."
    assert p.fields["new_answer"].endswith("O(log n) comparisons.")


@pytest.mark.parametrize("text", [UNBRACKETED, BOLD])
def test_unbracketed_and_decorated_markers(text):
    p = parse(text, INS)
    assert p.problems == {}
    assert p.fields["new_instruction"].startswith(("List three", "Write a limerick"))
    assert not p.fields["new_instruction"].startswith("*")


def test_echoed_template_is_unusable():
    p = parse(ECHOED, INS)
    assert p.fields == {}
    assert "echoes the template" in p.problems["new_instruction"]
    assert "echoes the template" in p.problems["new_answer"]
    assert "echoes the template" in parse("[Better Answer] N/A [End]", RES).problems["better_answer"]


def test_restated_format_then_the_real_fields():
    p = parse(RESTATED_THEN_ANSWERED, INS)
    assert p.fields["new_instruction"].startswith("Describe the causes of the French Revolution")
    assert p.fields["new_answer"].startswith("Fiscal crisis")


def test_markers_in_another_order():
    p = parse(OTHER_ORDER, INS)
    assert p.fields["new_instruction"].startswith("Since when has Paris")
    assert p.fields["new_answer"] == "Paris has been the capital of France since 987."


def test_cut_off_mid_answer():
    # the generation stopped at its token limit: the answer running to the end is kept as the
    # reference keeps it, and marked as cut
    p = parse(CUT_OFF, INS, cut_off=True)
    assert p.fields["new_instruction"].startswith("Explain the water cycle")
    assert p.fields["new_answer"] == parse(CUT_OFF, INS).fields["new_answer"] and p.cut == {"new_answer"}
    assert not p.problems
    # the same text from a generation that stopped by itself is complete
    assert parse(CUT_OFF, INS, cut_off=False).cut == set()
    # an instruction needs its closing marker, as in the reference
    p = parse("[New Instruction] Explain the water cycle in", INS, cut_off=True)
    assert p.problems["new_instruction"] == "cut off at the token limit" and not p.fields


@pytest.mark.parametrize("text", ["", "   ", "The answer is fine as it is."])
def test_empty_or_markerless(text):
    p = parse(text, RES)
    assert p.fields == {} and "no [Better Answer] marker" in p.problems["better_answer"]


def test_response_reflection_variants():
    assert parse("Review...\n[Better Answer] A hash table maps keys to slots. [End]", RES).fields == {
        "better_answer": "A hash table maps keys to slots."
    }
    assert parse("Better Answer: Use a list comprehension.", RES).fields["better_answer"] == "Use a list comprehension."
    repeated = "[Better Answer] your answer [End]\n[Better Answer] Boil water, steep for four minutes. [End]"
    assert parse(repeated, RES).fields["better_answer"] == "Boil water, steep for four minutes."
    assert parse("[Better Answer]   [End]", RES).problems["better_answer"] == "empty"


def test_a_placeholder_copied_after_a_value_is_dropped():
    p = parse("[New Instruction] Name a fruit. Your instruction [End]\n[New Answer] An apple. your answer [End]", INS)
    assert p.fields == {"new_instruction": "Name a fruit.", "new_answer": "An apple."}
