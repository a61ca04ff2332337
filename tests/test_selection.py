"""The selection rule of docs/method.md, branch by branch, with ties, NaN and the budget."""

import math

import polars as pl
import pytest

from reflectune.selection import decide, select, selected_rows, wide

NAN = math.nan


def row(orig=(0.8, 0.9), ins=(0.7, 0.9), res=(0.8, 0.9), ins_res=(0.7, 0.9)):
    """Scores as (IFD, r-IFD) per variant."""
    out = {}
    for name, (ifd, rifd) in {"orig": orig, "ins": ins, "res": res, "ins_res": ins_res}.items():
        out[f"{name}_ifd_ppl"], out[f"{name}_rifd_ppl"] = ifd, rifd
    return out


# (scores, released outcome, paper outcome), outcome = (branch, chosen)
TABLE = [
    # harder instruction accepted, reflected response better: ins_res
    (row(ins=(0.9, 0.8), ins_res=(0.85, 0.6)), ("ins_res", "ins_res"), ("ins_res", "ins_res")),
    # ... but ins_res fails a threshold
    (row(ins=(0.9, 0.8), ins_res=(1.2, 0.6)), ("ins_res", None), ("ins_res", None)),
    (row(ins=(0.9, 1.1), ins_res=(0.5, 1.0)), ("ins_res", None), ("ins_res", None)),
    # harder instruction accepted, reflected response not better: ins (paper keeps it)
    (row(ins=(0.9, 0.7), ins_res=(0.85, 0.8)), ("ins", None), ("ins", "ins")),
    (row(ins=(0.9, 1.1), ins_res=(0.85, 1.2)), ("ins", None), ("ins", None)),
    # instruction not improved, response reflection better: res
    (row(orig=(0.8, 0.9), ins=(0.7, 0.5), res=(0.6, 0.7)), ("res", "res"), ("res", "res")),
    (row(orig=(0.8, 0.9), ins=(0.7, 0.5), res=(1.01, 0.7)), ("res", None), ("res", None)),
    # neither: orig (paper keeps it)
    (row(orig=(0.8, 0.7), ins=(0.7, 0.5), res=(0.6, 0.9)), ("orig", None), ("orig", "orig")),
    (row(orig=(1.3, 0.7), ins=(0.7, 0.5), res=(0.6, 0.9)), ("orig", None), ("orig", None)),
    # ties are not improvements (strict comparisons)
    (row(orig=(0.8, 0.9), ins=(0.8, 0.5), res=(0.6, 0.9)), ("orig", None), ("orig", "orig")),
    (row(ins=(0.9, 0.8), ins_res=(0.85, 0.8)), ("ins", None), ("ins", "ins")),
    # NaN fails every comparison
    (row(orig=(0.8, 0.9), ins=(NAN, NAN), res=(0.6, 0.7)), ("res", "res"), ("res", "res")),
    (row(orig=(NAN, 0.9), ins=(0.9, 0.5), res=(0.6, 0.7)), ("res", "res"), ("res", "res")),
    (row(orig=(0.8, 0.9), ins=(0.9, 0.8), ins_res=(NAN, 0.5)), ("ins_res", None), ("ins_res", None)),
    (row(orig=(0.8, 0.9), ins=(0.7, 0.8), res=(0.6, NAN)), ("orig", None), ("orig", "orig")),
    (row(orig=(NAN, NAN), ins=(NAN, NAN), res=(NAN, NAN), ins_res=(NAN, NAN)), ("orig", None), ("orig", None)),
    # a score of 0 (how the reference codes failures) is a number here, never produced by us
    (row(orig=(0.8, 0.9), ins=(0.7, 0.8), res=(0.0, 0.0)), ("res", "res"), ("res", "res")),
]


@pytest.mark.parametrize("scores, released, paper", TABLE)
def test_decision_table(scores, released, paper):
    for mode, expected in (("released", released), ("paper", paper)):
        branch, chosen, reason = decide(scores, mode)
        assert (branch, chosen) == expected, (mode, reason)
        assert reason.startswith("IFD(ins)")
        if chosen:
            assert "passes" in reason
        elif mode == "released" and branch in ("ins", "orig"):
            assert "released rule keeps no" in reason
        else:
            assert "fails the thresholds" in reason


def test_unknown_mode():
    with pytest.raises(ValueError, match="released or paper"):
        decide(row(), "best")


def scored_table(n):
    rows = []
    for i in range(n):
        for variant in ("orig", "ins", "res", "ins_res"):
            ifd = {"orig": 0.5, "ins": 0.4, "res": 0.3 + i / 100, "ins_res": 0.9}[variant]
            rifd = {"orig": 0.9, "ins": 0.5, "res": 0.6, "ins_res": 0.9}[variant]
            rows.append({"sample_id": f"s{i}", "source_index": i, "variant": variant,
                         "instruction": f"q{i}-{variant}", "input": "", "output": f"a{i}-{variant}",
                         **{c: 1.0 for c in ("loss_q_direct", "loss_a_direct", "loss_q_condition", "loss_a_condition",
                                             "ppl_q_direct", "ppl_a_direct", "ppl_q_condition", "ppl_a_condition",
                                             "ifd_loss", "rifd_loss")},
                         "ifd_ppl": ifd, "rifd_ppl": rifd, "score_error": None})
    return pl.DataFrame(rows)


def test_wide_select_and_budget():
    table = wide(scored_table(10))
    assert table.height == 10 and table["source_index"].to_list() == list(range(10))
    decisions = select(table, "released")
    assert decisions["chosen"].to_list() == ["res"] * 10
    picked = selected_rows(decisions)
    assert picked["output"].to_list() == [f"a{i}-res" for i in range(10)]
    budgeted = select(table, "released", budget=0.3)
    kept = budgeted.filter(pl.col("selected"))
    # top 30% by IFD, highest first: res IFD grows with i
    assert sorted(kept["source_index"].to_list()) == [7, 8, 9]
    dropped = budgeted.filter(~pl.col("selected"))
    assert dropped.height == 7 and all("outside the budget" in r for r in dropped["reason"])
    with pytest.raises(ValueError, match="fraction"):
        select(table, budget=1.5)


def test_the_budget_rounds_down_as_the_paper_counts():
    from reflectune.selection import budget_count

    assert budget_count(0.02, 46325) == 926  # the paper's 2% of Alpaca
    assert budget_count(0.05, 52002) == 2600 and budget_count(0.07, 100) == 7 and budget_count(0.3, 10) == 3
    assert budget_count(0.05, 10) == 0
