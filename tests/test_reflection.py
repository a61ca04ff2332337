"""Teacher reflection with the packaged model (transformers): prompts, variants, fallbacks,
retries, and generation held to the output format."""

import pytest

from reflectune import prompts
from reflectune.records import PARSE_STATUSES, VARIANT, check_columns
from reflectune.reflection import Sampling, reflect

from .conftest import WELL_FORMED


def test_prompts_cover_the_criteria_and_markers():
    ins = prompts.instruction_reflection("Name a fruit.", "", "Apple.")
    assert [m["role"] for m in ins] == ["system", "user"]
    task, pair = ins[0]["content"], ins[1]["content"]
    for phrase in ("complexity of topic", "level of detail", "knowledge it requires", "ambiguous", "logical reasoning",
                   "helpfulness, relevance, accuracy and level of detail", "[New Instruction]", "[New Answer]", "[End]"):
        assert phrase in task, phrase
    assert "[Instruction]\nName a fruit." in pair and "Apple." in pair and "Input" not in pair
    # the task is a constant prefix, so a prefix-caching server computes it once
    assert prompts.instruction_reflection("Other.", "x", "y")[0] == ins[0]
    res = prompts.response_reflection("Translate.", "Bonjour", "Hello")
    assert "[The Start of Input]\nBonjour\n[The End of Input]" in res[1]["content"]
    assert "[Better Answer]" in res[0]["content"] and "helpfulness, relevance, accuracy" in res[0]["content"]
    # both ask for answers as detailed as possible, as the reference's prompts do
    assert "as detailed as possible" in res[0]["content"] and "as detailed as possible" in task
    assert prompts.response_reflection("Other.", "", "y")[0] == res[0]
    # the teacher is told its room in words, so that its answer ends before the token limit cuts it
    assert "words" not in res[0]["content"]
    for build in (prompts.instruction_reflection, prompts.response_reflection):
        told = build("Name a fruit.", "", "Apple.", 256)[0]["content"]
        assert "write the answer in at most 115 words" in told  # 256 tokens x 0.75 words x 0.6
        assert build("Other.", "x", "y", 256)[0]["content"] == told  # still one prefix for the whole run


class Recording:
    """The real teacher, with the sampling of each call recorded."""

    def __init__(self, engine):
        self.engine = engine
        self.teacher_id = engine.teacher_id
        self.calls = []

    def generate(self, chats, sampling, progress=None, formats=None):
        self.calls.append((len(chats), sampling))
        return self.engine.generate(chats, sampling, progress, formats)


@pytest.mark.slow  # generates for about 15 s
def test_packaged_teacher_end_to_end(teacher, reflection_records):
    recording = Recording(teacher)
    variants = reflect(reflection_records, recording, "both", Sampling(max_new_tokens=48))
    check_columns(variants, VARIANT, "reflect")
    assert variants.height == 3 * reflection_records.height
    assert sorted(variants["variant"].unique().to_list()) == ["ins", "ins_res", "res"]
    by = {(r["source_index"], r["variant"]): r for r in variants.iter_rows(named=True)}
    keys = ("sample_id", "source_index", "instruction", "input", "output")
    originals = {r["source_index"]: r for r in reflection_records.iter_rows(named=True)}
    base_of = lambda row: {k: (by[(row["source_index"], "ins")] if row["variant"] == "ins_res"
                               else originals[row["source_index"]])[k] for k in keys}
    for row in variants.iter_rows(named=True):
        # every row ends with a variant or a recorded fallback, raw text kept
        assert row["parse_status"] in PARSE_STATUSES and row["parse_status"] != "partial"
        assert (row["parse_status"] == "ok") == (row["parse_detail"] is None)
        assert len(row["raw_text"]) in (1, 2) and row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
        # a row is retried exactly when its first attempt was unusable (whether that attempt was
        # cut off is not recorded, so both readings bound it)
        if len(row["raw_text"]) == 2:
            assert not _first_fields(row, base_of(row), cut_off=True)
        else:
            assert _first_fields(row, base_of(row), cut_off=False)
        assert row["output"].strip() and row["instruction"].strip()
        assert row["teacher"].startswith("transformers:packaged:smollm2-135m-instruct@")
    for r in reflection_records.iter_rows(named=True):
        ins, res, ins_res = (by[(r["source_index"], v)] for v in ("ins", "res", "ins_res"))
        assert res["instruction"] == r["instruction"] and res["input"] == r["input"]
        assert ins_res["instruction"] == ins["instruction"] and ins_res["input"] == ins["input"]
        if res["parse_status"] != "ok":  # unusable, for whatever reason: the original's answer
            assert res["output"] == r["output"]
        assert ins["prompt_version"] == prompts.INSTRUCTION_VERSION and res["prompt_version"] == prompts.RESPONSE_VERSION
    # first attempts greedy; rows whose fields did not parse in 48 tokens got a retry, sampled
    first = recording.calls[0][1]
    retries = [s for n, s in recording.calls if s != first]
    assert first.temperature == 0.0
    assert retries and any(len(t) == 2 for t in variants["raw_text"]), "no row was retried: the check is vacuous"
    assert all(s.temperature > 0 for s in retries)


BASE = {"sample_id": "s1", "source_index": 0, "instruction": "Name a fruit.", "input": "red ones",
        "output": "Apple."}


def _variant(variant, text, cut_off=False):
    """A variant row from a teacher text, through the same parse, screen and finish as reflect."""
    from reflectune.reflection import read_text

    return read_text(variant, BASE, text, cut_off)


def test_an_ins_variant_without_a_usable_answer_is_the_original_pair():
    # a new instruction with the old answer would score as a harder instruction: dropped whole
    row = _variant("ins", "Weak.\n[New Instruction] Compare three fruits by vitamin content. [End]\n[New Answer]")
    assert (row["instruction"], row["input"], row["output"]) == ("Name a fruit.", "red ones", "Apple.")
    assert row["parse_status"] == "fallback" and "dropped with the unusable new answer" in row["parse_detail"]
    # the format line's placeholder, closed: the form without content
    echo = _variant("ins", "[New Instruction] Compare three fruits. [End]\n[New Answer] your answer [End]")
    assert echo["instruction"] == "Name a fruit." and echo["parse_status"] == "degenerate"
    assert "echoes the template" in echo["parse_detail"]
    looped = _variant("ins", "[New Instruction] Compare fruits. [End]\n[New Answer] " + "Fruit is good. " * 20 + "[End]")
    assert looped["instruction"] == "Name a fruit." and looped["parse_status"] == "degenerate"


def test_an_answer_cut_off_by_the_limit_is_cut_and_falls_back():
    row = _variant("ins", "[New Instruction] Compare three fruits. [End]\n[New Answer] Apples have vitamin C, bananas",
                   cut_off=True)
    # the variant stands on both fields: it falls back whole, its status the reason
    assert (row["instruction"], row["input"], row["output"]) == ("Name a fruit.", "red ones", "Apple.")
    assert row["parse_status"] == "cut" and "new_answer: cut off at the token limit" in row["parse_detail"]
    assert "new_instruction: dropped with the unusable new answer" in row["parse_detail"]
    res = _variant("res", "Too short.\n[Better Answer] An apple is a round fruit that", cut_off=True)
    assert res["output"] == "Apple." and res["parse_status"] == "cut"
    whole = _variant("res", "Too short.\n[Better Answer] An apple is a round fruit. [End]")
    assert whole["parse_status"] == "ok" and whole["parse_detail"] is None


def test_the_reference_post_processing_keeps_a_cut_answer():
    """Without the screen, _finish is the released code's post-processing: a cut answer is kept
    (`partial`); the selection cross-check (test_selection_reference) relies on it."""
    from reflectune import parsing
    from reflectune.reflection import _finish, _Job

    text = "Too short.\n[Better Answer] An apple is a round fruit that"
    row = _finish(_Job(dict(BASE), "res", [text]), parsing.parse(text, ("better_answer",), cut_off=True), "t")
    assert row["output"] == "An apple is a round fruit that" and row["parse_status"] == "partial"




@pytest.mark.slow  # generates for about 15 s
def test_constrained_generation_with_transformers(teacher, reflection_records):
    """xgrammar holds the packaged teacher to the form: analysis, then closed fields."""
    variants = reflect(reflection_records, teacher, "both", Sampling(max_new_tokens=96, constrained="on"))
    assert variants.height == 9
    assert all(how == "regex" for attempts in variants["constrained"] for how in attempts)
    assert variants["parse_status"].is_in(WELL_FORMED).mean() >= 0.85, variants["parse_status"].to_list()
    for row in variants.iter_rows(named=True):
        assert len(row["constrained"]) == len(row["raw_text"])


def _first_fields(row, base, cut_off):
    """Whether the row's first attempt was usable, read again through parse and screen."""
    from reflectune.parsing import parse
    from reflectune.reflection import screen

    wanted = ("new_instruction", "new_answer") if row["variant"] == "ins" else ("better_answer",)
    parsed = parse(row["raw_text"][0], wanted, cut_off=cut_off)
    screen(row["variant"], base, parsed)
    return set(wanted) <= set(parsed.fields)


def test_progress_moves_with_the_tokens_and_the_plan_grows_with_retries(teacher, reflection_records):
    calls = []
    chats = [prompts.response_reflection(r["instruction"], r["input"], r["output"])
             for r in reflection_records.to_dicts()]
    gens = teacher.generate(chats, Sampling(max_new_tokens=24), progress=lambda n, tokens: calls.append((n, tokens)))
    # one batch of three, yet progress every decoding step: the bar moves before the batch ends
    assert len(calls) >= 10 and all(0 < n < 1 for n, _ in calls[:-1])
    assert sum(n for n, _ in calls) == pytest.approx(3) and sum(t for _, t in calls) == sum(g.completion_tokens for g in gens)

    planned = []
    variants = reflect(reflection_records, teacher, "response", Sampling(max_new_tokens=8), plan=planned.append)
    retried = int((variants["raw_text"].list.len() > 1).sum())
    assert planned[0] == reflection_records.height and planned[-1] == reflection_records.height + retried


def test_a_verdict_is_the_first_word_and_nothing_else_counts_as_yes():
    from reflectune.reflection import Generation, verdict

    assert verdict(Generation("Yes")) == "yes" and verdict(Generation(" no.")) == "no"
    assert verdict(Generation('{"verdict": "No"}', constrained="json_schema")) == "no"
    assert verdict(Generation('{"verdict": "Yes', constrained="json_schema")) == "yes"  # cut before it closed
    assert verdict(Generation("Maybe, yes")) is None and verdict(Generation("")) is None
    assert verdict(Generation("Yes", error="timed out")) is None


@pytest.mark.slow  # about 10 s of prefill
def test_verification_by_the_packaged_teacher_keeps_yes_and_falls_back_on_no(teacher, tmp_path):
    """teacher.verify with the real teacher, held to Yes|No at decode time, behind the journal:
    each usable rewrite gets one more request, answered in one word; a No makes the variant
    its base pair; a rerun is answered from the journal."""
    import json

    from reflectune import journal
    from reflectune.reflection import _Job, _verify, read_text

    from .conftest import ROOT

    labelled = [json.loads(line) for line in (ROOT / "tests" / "data" / "labelled_rewrites.jsonl").read_text().splitlines()]
    jobs = []
    for r in labelled:
        base = {"sample_id": "s", "source_index": len(jobs), **r["base"]}
        row = read_text(r["variant"], base, r["text"], r["cut_off"])
        if row["parse_status"] == "ok" and r["variant"] != "ins_res":
            job = _Job(base, r["variant"], [r["text"]], ["none"])
            job.result = row | {"raw_text": [r["text"]], "constrained": ["none"]}
            jobs.append(job)
        if len(jobs) == 6:
            break
    added = []
    for kept in (journal.Journal(str(tmp_path), 0, 100), journal.Journal(str(tmp_path), 0, 100)):
        for job in jobs:  # each run starts from the screened rows
            job.result = read_text(job.variant, job.base, job.raw[0]) | {"raw_text": list(job.raw), "constrained": ["none"]}
        engine = journal.JournaledTeacher(teacher, kept)
        _verify(jobs, engine, Sampling(constrained="on"), None, added.append)
        kept.close(merge=True)
        if len(added) == 1:
            first = [dict(job.result) for job in jobs]
            assert engine.sent.requests == 6 and engine.sent.completion_tokens <= 6 * 2
    assert added == [6, 6] and engine.sent.requests == 0 and engine.replayed.requests == 6
    assert [job.result for job in jobs] == first
    for job, row in zip(jobs, first):
        assert row["raw_text"][-1] in ("[verify] Yes", "[verify] No") and row["constrained"][-1] == "regex"
        assert row["prompt_tokens"] > read_text(job.variant, job.base, job.raw[0])["prompt_tokens"]
        if row["raw_text"][-1] == "[verify] No":
            assert row["parse_status"] == "verify" and "answered 'No'" in row["parse_detail"]
            assert (row["instruction"], row["input"], row["output"]) == (
                job.base["instruction"], job.base["input"], job.base["output"])
        else:
            assert row["parse_status"] == "ok" and row["output"] != job.base["output"]
