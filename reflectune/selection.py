"""Selection: the student keeps, per original sample, at most one of its four variants
(docs/method.md, "Selection"), then an optional budget keeps the top fraction by IFD.

Every valid sample gets a decision: the branch it took, the variant chosen (or none), and
the reason. Comparisons are strict and NaN fails every comparison, so a sample whose scores
could not be computed is never selected.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from reflectune.records import SCORE_COLUMNS, VARIANTS

MODES = ("released", "paper")
METHODS = ("selective", "reflection", "cherry", "superfilter")
# the methods that run no teacher: the originals alone, filtered by IFD (Cherry LLM's rule)
IFD_ONLY = ("cherry", "superfilter")


def wide(scored: pl.DataFrame) -> pl.DataFrame:
    """One row per sample from the long table of scored variants: `{variant}_{column}`."""
    keep = ["instruction", "input", "output", *SCORE_COLUMNS, "score_error"]
    extra = [c for c in ("parse_status",) if c in scored.columns]
    parts = []
    for variant in VARIANTS:
        part = scored.filter(pl.col("variant") == variant).select(
            "sample_id", "source_index", *[pl.col(c).alias(f"{variant}_{c}") for c in keep + extra]
        )
        parts.append(part)
    out = parts[0]
    for part in parts[1:]:
        out = out.join(part.drop("source_index"), on="sample_id", how="left")
    return out.sort("source_index")


def decide(row: dict[str, Any], mode: str = "released") -> tuple[str, str | None, str]:
    """(branch, chosen variant or None, reason) for one sample's wide row."""
    if mode not in MODES:
        raise ValueError(f"unknown selection mode '{mode}': choose released or paper")
    ifd = {v: _num(row.get(f"{v}_ifd_ppl")) for v in VARIANTS}
    rifd = {v: _num(row.get(f"{v}_rifd_ppl")) for v in VARIANTS}

    if ifd["ins"] > ifd["orig"]:
        branch, why = _closer("ins_res", "ins", rifd, f"IFD(ins) {_fmt(ifd['ins'])} > IFD(orig) {_fmt(ifd['orig'])}: "
                               "the student takes the harder instruction")
    else:
        branch, why = _closer("res", "orig", rifd, f"IFD(ins) {_fmt(ifd['ins'])} is not > IFD(orig) "
                               f"{_fmt(ifd['orig'])}: the original instruction stays")
    variant = branch  # each branch keeps the variant of its name
    if mode == "released" and branch in ("ins", "orig"):
        return branch, None, f"{why}; the released rule keeps no {branch} branch"
    if not (rifd[variant] < 1 and ifd[variant] < 1):
        return branch, None, f"{why}; {variant} fails the thresholds r-IFD {_fmt(rifd[variant])} < 1 and IFD {_fmt(ifd[variant])} < 1"
    return branch, variant, f"{why}; {variant} passes r-IFD {_fmt(rifd[variant])} < 1 and IFD {_fmt(ifd[variant])} < 1"


def _closer(rewrite: str, base: str, rifd: dict[str, float], first: str) -> tuple[str, str]:
    """The second comparison: the response rewrite wins where its r-IFD is lower."""
    if rifd[rewrite] < rifd[base]:
        return rewrite, f"{first}; r-IFD({rewrite}) {_fmt(rifd[rewrite])} < r-IFD({base}) {_fmt(rifd[base])}"
    return base, f"{first}; r-IFD({rewrite}) {_fmt(rifd[rewrite])} is not < r-IFD({base}) {_fmt(rifd[base])}"


def decide_reflection(row: dict[str, Any]) -> tuple[str, str | None, str]:
    """Reflection-Tuning: the pair recycled by the teacher (instruction, then response) is kept."""
    if row.get("ins_res_output") is None:
        return "ins_res", None, "no recycled pair: the teacher wrote no ins_res variant"
    return "ins_res", "ins_res", "Reflection-Tuning keeps every recycled pair (instruction, then response reflection)"


def decide_cherry(row: dict[str, Any]) -> tuple[str, str | None, str]:
    """Cherry LLM's filter on the original pair: IFD >= 1 means the instruction does not help."""
    ifd = _num(row.get("orig_ifd_ppl"))
    if ifd < 1:
        return "orig", "orig", f"IFD(orig) {_fmt(ifd)} < 1"
    return "orig", None, f"IFD(orig) {_fmt(ifd)} is not < 1: the instruction does not help the response"


def select(table: pl.DataFrame, mode: str = "released", budget: float | None = None,
           method: str = "selective") -> pl.DataFrame:
    """The wide table with `branch`, `chosen`, `selected`, `reason` (and `chosen_ifd`).

    `budget` (0 < budget <= 1) keeps the top fraction by the chosen variant's IFD, highest
    first; the others are dropped with the budget as their reason. For selective and
    reflection the fraction is of the selected samples; for cherry and superfilter it is of
    all scored samples, as Cherry LLM counts (5% of Alpaca's 52,002 is 2,600).
    """
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"budget {budget} must be a fraction in (0, 1], e.g. 0.05 for the top 5%")
    if method == "selective":
        decisions = [decide(row, mode) for row in table.iter_rows(named=True)]
    elif method == "reflection":
        decisions = [decide_reflection(row) for row in table.iter_rows(named=True)]
    elif method in IFD_ONLY:
        decisions = [decide_cherry(row) for row in table.iter_rows(named=True)]
    else:
        raise ValueError(f"unknown selection method '{method}': choose one of {', '.join(METHODS)}")
    chosen_ifd = [
        _num(row.get(f"{variant}_ifd_ppl")) if variant else math.nan
        for row, (_, variant, _) in zip(table.iter_rows(named=True), decisions)
    ]
    out = table.with_columns(
        pl.Series("branch", [d[0] for d in decisions], pl.String),
        pl.Series("chosen", [d[1] for d in decisions], pl.String),
        pl.Series("reason", [d[2] for d in decisions], pl.String),
        pl.Series("chosen_ifd", chosen_ifd, pl.Float64),
    ).with_columns(selected=pl.col("chosen").is_not_null())
    if budget is not None:
        out = _apply_budget(out, budget, out.height if method in IFD_ONLY else None)
    return out


def budget_count(budget: float, n: int) -> int:
    """How many of `n` a budget keeps, rounded down as the paper counts (2% of 46,325 is 926);
    the tolerance keeps 0.07 x 100 at 7 despite binary fractions."""
    return math.floor(budget * n + 1e-9)


def _apply_budget(out: pl.DataFrame, budget: float, of: int | None = None) -> pl.DataFrame:
    selected = out.filter(pl.col("selected"))
    keep_n = budget_count(budget, selected.height if of is None else of)
    # highest IFD first; ties broken by source order so the cut is deterministic
    ranked = selected.sort(["chosen_ifd", "source_index"], descending=[True, False])
    kept = set(ranked["sample_id"].head(keep_n).to_list())
    dropped = pl.col("selected") & ~pl.col("sample_id").is_in(list(kept))
    return out.with_columns(
        reason=pl.when(dropped)
        .then(pl.col("reason") + pl.lit(f"; outside the budget (top {budget:.0%} by IFD keeps {keep_n})"))
        .otherwise(pl.col("reason")),
        chosen=pl.when(dropped).then(None).otherwise(pl.col("chosen")),
        selected=pl.col("selected") & ~dropped,
    )


def selected_rows(decisions: pl.DataFrame) -> pl.DataFrame:
    """The chosen variant of each selected sample, as a pair with its scores."""
    rows = []
    for row in decisions.filter(pl.col("selected")).iter_rows(named=True):
        v = row["chosen"]
        rows.append({
            "sample_id": row["sample_id"],
            "source_index": row["source_index"],
            "variant": v,
            "branch": row["branch"],
            "instruction": row[f"{v}_instruction"],
            "input": row[f"{v}_input"],
            "output": row[f"{v}_output"],
            **{c: row[f"{v}_{c}"] for c in SCORE_COLUMNS},
        })
    schema = {"sample_id": pl.String, "source_index": pl.Int64, "variant": pl.String, "branch": pl.String,
              "instruction": pl.String, "input": pl.String, "output": pl.String, **{c: pl.Float64 for c in SCORE_COLUMNS}}
    return pl.DataFrame(rows, schema=schema)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4f}"
