import math

import polars as pl
import pytest

from reflectune import oracle, templates
from reflectune.records import SCORES, check_columns
from reflectune.scoring import TokenSequence, build_sequences, score_rows, score_table

from .stats import median_relative_difference, spearman

LONG = {"instruction": "Describe the history of the printing press.", "input": "", "output": " ".join(["The press spread quickly across Europe."] * 60)}


def test_sequences_follow_the_definition(tokenizer):
    """The reference's tokens: each conditional text tokenized whole, labelled from as many
    tokens as its prompt has alone; the r-IFD side joins instruction and input as they are."""
    row = {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit"}
    parts = build_sequences([row], tokenizer, "vicuna")[0]
    ids = lambda text: tuple(tokenizer(text)["input_ids"])  # noqa: E731
    prompt = templates.render("vicuna", row["instruction"], row["input"])
    reverse = templates.reverse("vicuna", row["output"])
    assert parts["a_condition"] == TokenSequence(ids(prompt + "Bonne nuit"), len(ids(prompt)))
    assert parts["q_condition"] == TokenSequence(ids(reverse + "Translate to French.Good night"), len(ids(reverse)))
    assert parts["a_direct"] == TokenSequence(ids("Bonne nuit"), 1)
    assert parts["q_direct"] == TokenSequence(ids("Translate to French.Good night"), 1)
    lines = build_sequences([row], tokenizer, "vicuna", join="newline")[0]
    assert lines["q_direct"] == TokenSequence(ids("Translate to French.\nGood night"), 1)
    assert lines["a_condition"] == parts["a_condition"]


def test_truncation_rules(tokenizer):
    parts = build_sequences([LONG], tokenizer, "vicuna", max_length=128)[0]
    prompt_len = len(tokenizer(templates.render("vicuna", LONG["instruction"]))["input_ids"])
    assert len(parts["a_condition"].ids) == 128
    assert len(parts["a_direct"].ids) == 128 - prompt_len + 1
    # the reverse prompt holds the whole response, so it fills max_length: no instruction token left
    assert parts["q_condition"].startswith("prompt of") and "fills max_length 128" in parts["q_condition"]


def test_failures_are_nan_with_a_reason_never_zero(student):
    rows = [
        {"instruction": "Say something.", "input": "", "output": "  "},
        {**LONG},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    scores = score_rows(rows, student, "vicuna", max_length=128)
    assert all(math.isnan(scores[0][k]) for k in ("ifd_ppl", "rifd_ppl", "loss_a_direct"))
    assert "empty response" in scores[0]["score_error"]
    assert math.isnan(scores[1]["rifd_ppl"]) and not math.isnan(scores[1]["ifd_ppl"])
    assert "q_condition: prompt of" in scores[1]["score_error"]
    assert scores[2]["score_error"] is None
    one_token = score_rows([{"instruction": "Hi", "input": "", "output": "Hello there."}], student)[0]
    assert "q_direct: a one-token text has nothing to score" in one_token["score_error"]
    assert all(v > 0 and math.isfinite(v) for k, v in scores[2].items() if k != "score_error")


class MidwayFailure:
    """The real engine, with a fault injected at the engine boundary: it scores part of the
    sequences, then raises, as an engine that dies or runs out of memory mid-shard."""

    max_sequence = None

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def token_nll(self, seqs, progress=None):
        self.engine.token_nll(seqs[: len(seqs) // 2], progress)
        raise RuntimeError("injected engine failure")


def test_an_engine_failure_raises_and_is_never_a_row_of_nan(student):
    rows = [{"instruction": "Greet me.", "input": "", "output": "Hello."}, {**LONG, "output": LONG["output"][:600]}]
    with pytest.raises(RuntimeError, match="injected engine failure"):
        score_rows(rows, MidwayFailure(student), "vicuna")


def test_sequences_past_the_engines_context_are_the_rows_own_failure(student):
    """What a row's content rules out is decided before the engine runs: those sequences are
    NaN with the reason and never sent; the rest are scored."""

    class ShortContext:
        tokenizer = student.tokenizer
        max_sequence = 100

        def __init__(self):
            self.sent = []

        def token_nll(self, seqs, progress=None):
            self.sent.extend(seqs)
            return student.token_nll(seqs, progress)

    engine = ShortContext()
    rows = [{"instruction": "Greet me.", "input": "", "output": "Hello."}, {**LONG, "output": LONG["output"][:600]}]
    scores = score_rows(rows, engine, "vicuna")
    assert scores[0]["score_error"] is None and math.isfinite(scores[0]["ifd_ppl"])
    assert "does not fit the engine's context of 100 tokens" in scores[1]["score_error"]
    assert math.isnan(scores[1]["ifd_ppl"])
    assert all(len(s.ids) <= 100 for s in engine.sent)


def test_score_table_keeps_rows_in_order(student, sample_rows):
    df = pl.DataFrame(sample_rows[:6]).with_row_index("source_index")
    out = score_table(df, student)
    check_columns(out, SCORES, "score")
    assert out["source_index"].to_list() == list(range(6))
    assert out["instruction"].to_list() == [r["instruction"] for r in sample_rows[:6]]


def test_parity_with_the_per_sample_definition(student, student_fp32, sample_rows):
    """The fast scorer as `auto` runs it (batched, packed, bfloat16 where the CPU has native
    bfloat16, else float32) against the plain fp32 batch-1 oracle. The bounds hold for both
    dtypes: measured bf16 against fp32 on the 41 sample pairs (AVX-512 BF16 / AMX CPU), r-IFD
    moved by a median 2.1% (Spearman 0.994) and IFD by 1.2% (Spearman 0.998); fp32 agrees
    with the oracle to 1e-5."""
    rows = sample_rows[:20]
    fast = score_rows(rows, student)
    ref = [oracle.score_pair(student_fp32.model, student_fp32.tokenizer, r["instruction"], r.get("input", ""),
                             r["output"]) for r in rows]
    for key in ("ifd_ppl", "rifd_ppl"):
        a, b = [r[key] for r in ref], [r[key] for r in fast]
        assert spearman(a, b) >= 0.98, key
        assert median_relative_difference(a, b) <= 0.04, key


@pytest.mark.parametrize("template", ["alpaca", "wizardlm", "chat"])
def test_other_templates_match_the_definition(student_fp32, sample_rows, template):
    """The definition, in fp32 on both sides: batching and packing change nothing."""
    model, tok = student_fp32.model, student_fp32.tokenizer
    rows = [r for r in sample_rows if r.get("input")][:2] + sample_rows[:2]
    fast = score_rows(rows, student_fp32, template)
    tolerance = 1e-4
    for row, got in zip(rows, fast):
        want = oracle.score_pair(model, tok, row["instruction"], row.get("input", ""), row["output"], template)
        for key in ("ifd_ppl", "rifd_ppl", "ifd_loss", "rifd_loss"):
            assert got[key] == pytest.approx(want[key], rel=tolerance), (template, key)


def test_truncated_scores_match_the_definition(student_fp32):
    model, tok = student_fp32.model, student_fp32.tokenizer
    row = {**LONG, "output": LONG["output"][:900]}
    got = score_rows([row], student_fp32, "vicuna", max_length=160)[0]
    want = oracle.score_pair(model, tok, row["instruction"], "", row["output"], "vicuna", max_length=160)
    tolerance = 1e-4
    for key in ("loss_a_condition", "loss_a_direct", "ifd_ppl"):
        assert got[key] == pytest.approx(want[key], rel=tolerance), key
