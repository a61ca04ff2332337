import math

import polars as pl
import pytest
import torch

from reflectune import templates
from reflectune.records import SCORES, check_columns
from reflectune.scoring import TokenSequence, build_sequences, score_rows, score_table

from . import oracle
from .stats import median_relative_difference, spearman

LONG = {"instruction": "Describe the history of the printing press.", "input": "", "output": " ".join(["The press spread quickly across Europe."] * 60)}


def test_sequences_follow_the_definition(tokenizer):
    row = {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit"}
    parts = build_sequences([row], tokenizer, "vicuna")[0]
    prompt = tokenizer(templates.render("vicuna", row["instruction"], row["input"]))["input_ids"]
    answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    question = tokenizer("Translate to French.\nGood night", add_special_tokens=False)["input_ids"]
    reverse = tokenizer(templates.reverse("vicuna", row["output"]))["input_ids"]
    assert parts["a_condition"] == TokenSequence(tuple(prompt + answer), len(prompt))
    assert parts["q_condition"] == TokenSequence(tuple(reverse + question), len(reverse))
    bos = tokenizer("")["input_ids"]
    assert parts["a_direct"] == TokenSequence(tuple(bos + answer), 1)
    assert parts["q_direct"] == TokenSequence(tuple(bos + question), 1)


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


def test_a_failing_sequence_costs_only_its_own_row(student):
    class FailsOnLong:
        """The real engine, with a fault injected for one sequence length."""

        tokenizer = student.tokenizer

        def token_nll(self, seqs, progress=None):
            if any(len(s.ids) > 100 for s in seqs):
                raise RuntimeError("injected device error")
            return student.token_nll(seqs, progress)

    rows = [{"instruction": "Greet me.", "input": "", "output": "Hello."}, {**LONG, "output": LONG["output"][:600]}]
    scores = score_rows(rows, FailsOnLong(), "vicuna")
    assert scores[0]["score_error"] is None and math.isfinite(scores[0]["ifd_ppl"])
    assert "injected device error" in scores[1]["score_error"] and math.isnan(scores[1]["ifd_ppl"])


def test_score_table_keeps_rows_in_order(student, sample_rows):
    df = pl.DataFrame(sample_rows[:6]).with_row_index("source_index")
    out = score_table(df, student)
    check_columns(out, SCORES, "score")
    assert out["source_index"].to_list() == list(range(6))
    assert out["instruction"].to_list() == [r["instruction"] for r in sample_rows[:6]]


@pytest.fixture(scope="module")
def fp32_model(student):
    from reflectune.engines.hf import load_causal_lm

    if student.dtype == torch.float32:
        return student.model, student.tokenizer
    return load_causal_lm("packaged:smollm2-135m-instruct", "float32", "cpu")


def test_parity_with_the_per_sample_definition(student, fp32_model, sample_rows):
    """The fast scorer (batched, packed, its dtype) against the plain fp32 batch-1 oracle."""
    model, tok = fp32_model
    rows = sample_rows[:20]
    fast = score_rows(rows, student)
    ref = [oracle.score_pair(model, tok, r["instruction"], r.get("input", ""), r["output"]) for r in rows]
    for key in ("ifd_ppl", "rifd_ppl"):
        a, b = [r[key] for r in ref], [r[key] for r in fast]
        assert spearman(a, b) >= 0.98, key
        assert median_relative_difference(a, b) <= 0.03, key


@pytest.mark.parametrize("template", ["alpaca", "wizardlm", "chat"])
def test_other_templates_match_the_definition(student, fp32_model, sample_rows, template):
    model, tok = fp32_model
    rows = [r for r in sample_rows if r.get("input")][:2] + sample_rows[:2]
    fast = score_rows(rows, student, template)
    tolerance = 1e-3 if student.dtype == torch.float32 else 0.05
    for row, got in zip(rows, fast):
        want = oracle.score_pair(model, tok, row["instruction"], row.get("input", ""), row["output"], template)
        for key in ("ifd_ppl", "rifd_ppl", "ifd_loss", "rifd_loss"):
            assert got[key] == pytest.approx(want[key], rel=tolerance), (template, key)


def test_truncated_scores_match_the_definition(student, fp32_model):
    model, tok = fp32_model
    row = {**LONG, "output": LONG["output"][:900]}
    got = score_rows([row], student, "vicuna", max_length=160)[0]
    want = oracle.score_pair(model, tok, row["instruction"], "", row["output"], "vicuna", max_length=160)
    tolerance = 1e-3 if student.dtype == torch.float32 else 0.05
    for key in ("loss_a_condition", "loss_a_direct", "ifd_ppl"):
        assert got[key] == pytest.approx(want[key], rel=tolerance), key
