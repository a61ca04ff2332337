"""Reflectune selects what the paper's released code selects.

Fixed teacher texts (well-formed rewrites, texts without markers, answers cut off by the
token limit, copies of the original) go through reflectune (parse, variants, the fast scorer
in float32 as `--exact`, the released rule) and through reflectune/oracle.py (the released
post-processing, per-sample fp32 scoring with the whole text tokenized, the released rule),
which shares no code with the rest of the package. Every sample must get the same variant.
"""

import json

import polars as pl
import pytest

from reflectune import intake, oracle, parsing, scoring, selection
from reflectune.reflection import _finish, _Job
from reflectune.stages import long_table

from .conftest import SAMPLE

# The first 12 pairs of the sample (3 with an input) and six more pairs with an input: every
# kind of teacher text below occurs, with and without input.
SAMPLE_ROWS = 12
WITH_INPUT = [
    ("Translate the sentence into French.", "The library opens at nine.", "La bibliothèque ouvre à neuf heures."),
    ("Summarize the text in one sentence.", "Bees pollinate crops, and their decline threatens harvests worldwide.",
     "Declining bee numbers put crop harvests at risk."),
    ("Classify the sentiment of the review.", "The battery died after two days and support never replied.",
     "Negative."),
    ("Extract the year from the sentence.", "The bridge was completed in 1937 after four years of work.", "1937"),
    ("Rewrite the sentence in the passive voice.", "The committee approved the budget.",
     "The budget was approved by the committee."),
    ("Name the capital of the country.", "Canada", "Ottawa is the capital of Canada."),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "pairs.jsonl"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()][:SAMPLE_ROWS]
    rows += [{"instruction": i, "input": x, "output": o} for i, x, o in WITH_INPUT]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return intake.load(str(path)).valid


def teacher_texts(i: int, row: dict) -> dict[str, tuple[str, bool]]:
    """(text, cut off at the token limit) of each variant for the i-th pair: a mix of
    well-formed rewrites, no markers, cut-off answers and copies of the original."""
    instruction, output = row["instruction"], row["output"]
    harder = f"{instruction.rstrip('.?!')} and explain each step of your reasoning with an example."
    longer = f"{output} To put it another way, the key point is this: {output[:80]}"
    shorter = output.split(". ")[0].rstrip(".") + "."
    kind = i % 6
    if kind in (0, 3):  # the teacher wrote no markers at all
        ins = ("I think the instruction is fine and the answer is fine.", False)
    elif kind == 1:  # the new answer ran into the token limit
        ins = (f"Weak.\n[New Instruction] {harder} [End]\n[New Answer] {longer[:60]}", True)
    else:
        ins = (f"The instruction is vague.\n[New Instruction] {harder} [End]\n[New Answer] {longer} [End]", False)
    if kind == 3:
        res = ("The answer is acceptable as written.", False)
    elif kind == 4:  # a copy of the original answer
        res = (f"Could be better.\n[Better Answer] {output} [End]", False)
    elif kind == 5:
        res = (f"Too short.\n[Better Answer] {longer[: 40 + 7 * (i % 5)]}", True)
    else:
        res = (f"It rambles.\n[Better Answer] {shorter if i % 2 else longer} [End]", False)
    ins_res = (f"Could be clearer.\n[Better Answer] {shorter} In short: {harder} [End]", False) if i % 4 \
        else ("No change needed.", False)
    return {"ins": ins, "res": res, "ins_res": ins_res}


def reflectune_variants(records: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for i, base in enumerate(records.iter_rows(named=True)):
        texts = teacher_texts(i, base)
        jobs = {}
        for variant in ("ins", "res", "ins_res"):
            pair = base if variant != "ins_res" else {**base, **{k: jobs["ins"][k] for k in ("instruction", "input",
                                                                                           "output")}}
            text, cut = texts[variant]
            wanted = ("new_instruction", "new_answer") if variant == "ins" else ("better_answer",)
            job = _Job({k: pair[k] for k in ("sample_id", "source_index", "instruction", "input", "output")},
                       variant, [text], ["none"], 10, 10)
            jobs[variant] = _finish(job, parsing.parse(text, wanted, cut_off=cut), "fixed")
        rows += jobs.values()
    return pl.DataFrame(rows)


def oracle_choice(model, tok, i: int, row: dict, memo: dict) -> str | None:
    texts = teacher_texts(i, row)
    ins = oracle.instruction_fields(texts["ins"][0], row["instruction"], row["input"], row["output"])
    pairs = {
        "orig": (row["instruction"], row["input"], row["output"]),
        "ins": ins,
        "res": (row["instruction"], row["input"], oracle.response_field(texts["res"][0], row["output"])),
        "ins_res": (ins[0], ins[1], oracle.response_field(texts["ins_res"][0], ins[2])),
    }
    # batch 1 is deterministic: a pair seen before (a fallback) has the scores it had
    scores = {v: memo.get(pair) or memo.setdefault(pair, oracle.score_pair(model, tok, *pair))
              for v, pair in pairs.items()}
    return oracle.select_released(scores["orig"], scores["ins"], scores["res"], scores["ins_res"])


@pytest.mark.slow
def test_exact_scoring_selects_the_released_codes_variant_for_every_sample(records, student_fp32):
    variants = reflectune_variants(records)
    statuses = set(variants["parse_status"])
    assert {"ok", "fallback", "partial", "degenerate"} <= statuses, statuses  # every kind of teacher text occurs
    table = long_table(records, variants)
    counts = {}
    scored = scoring.score_table(table, student_fp32, counts=counts)
    decisions = selection.select(selection.wide(scored), "released").sort("source_index")
    got = decisions["chosen"].to_list()
    model, tok = student_fp32.model, student_fp32.tokenizer
    memo = {}
    want = [oracle_choice(model, tok, i, row, memo) for i, row in enumerate(records.iter_rows(named=True))]
    assert len(got) == len(want) == records.height == SAMPLE_ROWS + len(WITH_INPUT)
    mismatches = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, mismatches
    # a check that can fail: both rules pick rewrites of both kinds, and drop samples
    assert {"res", "ins_res", None} <= set(want), want
    # copies of the original (fallbacks, the shared direct instruction) were scored once
    assert counts["sequences_scored"] < counts["sequences"]


def test_a_shard_where_every_variant_fell_back_selects_nothing(records, student_fp32):
    """Fallbacks are the original pair: scored once, they tie with it and are never chosen."""
    base = records.head(12)
    rows = []
    for r in base.iter_rows(named=True):
        for variant in ("ins", "res", "ins_res"):
            wanted = ("new_instruction", "new_answer") if variant == "ins" else ("better_answer",)
            job = _Job({k: r[k] for k in ("sample_id", "source_index", "instruction", "input", "output")},
                       variant, ["No markers here."], ["none"], 10, 10)
            rows.append(_finish(job, parsing.parse("No markers here.", wanted), "fixed"))
    variants = pl.DataFrame(rows)
    assert set(variants["parse_status"]) == {"fallback"}
    counts = {}
    scored = scoring.score_table(long_table(base, variants), student_fp32, counts=counts)
    decisions = selection.select(selection.wide(scored), "released")
    assert not decisions["selected"].any(), decisions.select("branch", "reason").to_dicts()
    assert set(decisions["branch"]) <= {"orig"}
    # each distinct sequence once: those of the originals
    distinct = {seq for parts in scoring.build_sequences(base.to_dicts(), student_fp32.tokenizer)
                for seq in parts.values() if isinstance(seq, scoring.TokenSequence)}
    assert counts["sequences"] == 4 * len(distinct) and counts["sequences_scored"] == len(distinct)
    for v in ("ins", "res", "ins_res"):  # the copies carry the original's scores exactly
        assert scored.filter(pl.col("variant") == v)["ifd_ppl"].to_list() == \
            scored.filter(pl.col("variant") == "orig")["ifd_ppl"].to_list()
