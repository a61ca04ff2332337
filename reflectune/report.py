"""`{out}/report.html`: one self-contained page (plots are inline SVG) to decide whether to
trust a recycled dataset. Reads only the run's outputs: decisions.parquet and manifest.json
(and evaluation.json when the run evaluated its student)."""

from __future__ import annotations

import html
import math
import re
from typing import Any

import polars as pl

from reflectune import io
from reflectune import manifest as run
from reflectune.journal import dollars
from reflectune.records import VARIANTS
from reflectune.run_folder import RunFolder

COLOURS = {"orig": "#4c78a8", "ins": "#f58518", "res": "#54a24b", "ins_res": "#b279a2"}
LIMIT = 2.0  # IFD and r-IFD axes run 0..2; larger values are drawn at the edge


def write(out: str, manifest: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
          price_in: float = 0.0, price_out: float = 0.0) -> str:
    """Build the report from the outputs in `out` and write `out/report.html`; returns its URI."""
    folder = RunFolder(out)
    manifest = manifest or io.read_json(folder.manifest)
    if evaluation is None and io.exists(folder.evaluation):
        evaluation = io.read_json(folder.evaluation)
    decisions = io.read_parquet(folder.decisions)
    uri = folder.report
    io.write_bytes(uri, render(decisions, manifest, evaluation, price_in, price_out).encode("utf-8"))
    return uri


def render(decisions: pl.DataFrame, manifest: dict[str, Any], evaluation: dict[str, Any] | None = None,
           price_in: float = 0.0, price_out: float = 0.0) -> str:
    usage = manifest.get("token_usage", {})
    summary = "".join(f"<li>{_code(_e(line))}</li>" for line in run.lines(manifest) if not line.startswith("report: "))
    parts = [
        f"<h1>Reflectune report: {_e(manifest.get('parameters', {}).get('dataset', ''))}</h1>",
        f"<ul>{summary}</ul>",
        "<h2>IFD per variant</h2>", _histograms(decisions, "ifd_ppl"),
        "<h2>r-IFD per variant</h2>", _histograms(decisions, "rifd_ppl"),
        "<h2>IFD against r-IFD</h2><p>Dashed lines: the selection thresholds (a kept pair has IFD &lt; 1 and "
        "r-IFD &lt; 1). Values above 2 are drawn at the edge.</p>", _scatter(decisions),
        "<h2>Selection branches</h2>", _branches(manifest["counts"].get("per_branch", {})),
        "<h2>Teacher rewrites: usable or fallen back</h2>", _parse_table(manifest["counts"].get("parse_status", {})),
        "<h2>Token usage and cost</h2>", _usage(usage, manifest.get("teacher_spend"), price_in, price_out),
        "<h2>Most and least helpful rewrites</h2><p>IFD change of the instruction-and-response rewrite "
        "(ins_res) against the original, among the usable rewrites: a higher IFD means the student finds the "
        "pair more instructive.</p>",
        _rewrites(decisions),
    ]
    if evaluation:
        parts += ["<h2>Evaluation</h2>", _evaluation(evaluation)]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Reflectune report</title><style>{STYLE}</style>"
        "</head><body>" + "\n".join(parts) + "</body></html>"
    )


STYLE = ("body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}"
         "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
         "vertical-align:top;text-align:left}svg{background:#fff;border:1px solid #ddd;margin:.3rem}"
         ".pair{max-width:32rem;white-space:pre-wrap;font-size:.85rem}")


def _code(line: str) -> str:
    """`name` as <code>name</code>, as the summary marks names."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", line)


def _e(x: Any) -> str:
    return html.escape(str(x)) if x is not None else ""


def _values(decisions: pl.DataFrame, column: str) -> list[float]:
    if column not in decisions.columns:
        return []
    return [float(v) for v in decisions[column].to_list() if v is not None and math.isfinite(v)]


def _histograms(decisions: pl.DataFrame, metric: str, bins: int = 20) -> str:
    charts = []
    for variant in VARIANTS:
        values = _values(decisions, f"{variant}_{metric}")
        counts = [0] * bins
        for v in values:
            counts[min(int(min(v, LIMIT) / LIMIT * bins), bins - 1)] += 1
        w, h, pad = 260, 170, 28
        top = max(counts) or 1
        bars = "".join(
            f"<rect x='{pad + i * (w - 2 * pad) / bins:.1f}' y='{h - pad - n / top * (h - 2 * pad):.1f}' "
            f"width='{(w - 2 * pad) / bins - 1:.1f}' height='{n / top * (h - 2 * pad):.1f}' fill='{COLOURS[variant]}'/>"
            for i, n in enumerate(counts))
        one = pad + (1 / LIMIT) * (w - 2 * pad)
        charts.append(
            f"<svg class='plot' width='{w}' height='{h}' viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>"
            f"<text x='{w / 2}' y='16' text-anchor='middle' font-size='12'>{variant} (n={len(values)})</text>{bars}"
            f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#333'/>"
            f"<line x1='{one:.1f}' y1='{pad}' x2='{one:.1f}' y2='{h - pad}' stroke='#d62728' stroke-dasharray='4'/>"
            f"<text x='{pad}' y='{h - 10}' font-size='10'>0</text><text x='{one:.1f}' y='{h - 10}' font-size='10'>1</text>"
            f"<text x='{w - pad}' y='{h - 10}' font-size='10' text-anchor='end'>{LIMIT:g}+</text>"
            f"<text x='4' y='{pad}' font-size='10'>{top}</text></svg>")
    return "<div>" + "".join(charts) + "</div>"


def _scatter(decisions: pl.DataFrame) -> str:
    w = h = 420
    pad = 40
    span = w - 2 * pad

    def xy(ifd: float, rifd: float) -> tuple[float, float]:
        return pad + min(ifd, LIMIT) / LIMIT * span, h - pad - min(rifd, LIMIT) / LIMIT * span

    dots, legend = [], []
    for k, variant in enumerate(VARIANTS):
        a, b = f"{variant}_ifd_ppl", f"{variant}_rifd_ppl"
        if a not in decisions.columns:
            continue
        for ifd, rifd in decisions.select(a, b).iter_rows():
            if ifd is not None and rifd is not None and math.isfinite(ifd) and math.isfinite(rifd):
                x, y = xy(ifd, rifd)
                dots.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{COLOURS[variant]}' fill-opacity='.7'/>")
        legend.append(f"<rect x='{w - 110}' y='{12 + 16 * k}' width='10' height='10' fill='{COLOURS[variant]}'/>"
                      f"<text x='{w - 95}' y='{21 + 16 * k}' font-size='11'>{variant}</text>")
    x1, y1 = xy(1, 1)
    return (f"<svg class='plot' width='{w}' height='{h}' viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>"
            f"<rect x='{pad}' y='{y1:.1f}' width='{x1 - pad:.1f}' height='{h - pad - y1:.1f}' fill='#2ca02c' fill-opacity='.07'/>"
            f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#333'/>"
            f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#333'/>"
            f"<line x1='{x1:.1f}' y1='{pad}' x2='{x1:.1f}' y2='{h - pad}' stroke='#d62728' stroke-dasharray='5'/>"
            f"<line x1='{pad}' y1='{y1:.1f}' x2='{w - pad}' y2='{y1:.1f}' stroke='#d62728' stroke-dasharray='5'/>"
            f"<text x='{w / 2}' y='{h - 8}' text-anchor='middle' font-size='12'>IFD (ppl)</text>"
            f"<text x='12' y='{h / 2}' font-size='12' transform='rotate(-90 12 {h / 2})' text-anchor='middle'>r-IFD (ppl)</text>"
            + "".join(dots) + "".join(legend) + "</svg>")


def _branches(per_branch: dict[str, int]) -> str:
    if not per_branch:
        return "<p>No samples reached selection.</p>"
    w, row = 520, 26
    top = max(per_branch.values()) or 1
    items = sorted(per_branch.items())
    h = row * len(items) + 20
    bars = "".join(
        f"<text x='4' y='{14 + i * row + 12}' font-size='12'>{_e(k)}</text>"
        f"<rect x='130' y='{14 + i * row}' width='{n / top * (w - 200):.1f}' height='{row - 8}' "
        f"fill='{'#54a24b' if k.endswith('kept') else '#bbbbbb'}'/>"
        f"<text x='{136 + n / top * (w - 200):.1f}' y='{14 + i * row + 12}' font-size='12'>{n}</text>"
        for i, (k, n) in enumerate(items))
    return f"<svg class='plot' width='{w}' height='{h}' viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>{bars}</svg>"


def _parse_table(parse_status: dict[str, dict[str, int]]) -> str:
    """Per variant: the usable rewrites and those that fell back to the original pair, by
    reason; no rows where no teacher ran (cherry, superfilter)."""
    rows = []
    for variant, counts in parse_status.items():
        n = sum(counts.values())
        usable = counts.get("ok", 0)
        reasons = ", ".join(f"{_e(k)} {v}" for k, v in counts.items() if k != "ok") or "none"
        rows.append(f"<tr><td>{variant}</td><td>{usable / n:.0%} ({usable}/{n})</td><td>{(n - usable) / n:.0%}</td>"
                    f"<td>{reasons}</td></tr>")
    return ("<p>A rewrite is usable when every field parsed and passed the content checks (not cut, not a loop or "
            "a copy, not a review of the old answer, not a fragment of the analysis, in the pair's script); the "
            "rest fell back to the original pair and cannot be selected.</p>"
            "<table><tr><th>variant</th><th>usable</th><th>fell back to the original</th><th>why</th></tr>"
            + "".join(rows) + "</table>")


def _usage(usage: dict[str, Any], spend: dict[str, Any] | None, price_in: float, price_out: float) -> str:
    """Teacher requests and tokens: sent by this run, replayed from the journal (not paid
    again), held by the journal (everything paid for in this folder), at the run's prices
    unless others are given here."""
    spend = spend or {}
    if not (price_in or price_out):
        price_in, price_out = spend.get("price_input_per_m", 0.0), spend.get("price_output_per_m", 0.0)
    cost = lambda p, c: (f"${dollars((p * price_in + c * price_out) / 1e6)}" if price_in or price_out else "no price set")
    journal = spend.get("journal", {})
    rows = [("all generations in the variants", usage.get("generations", 0), usage.get("prompt_tokens", 0),
             usage.get("completion_tokens", 0))]
    if spend:
        rows += [("sent by this run", spend["requests_sent"], spend["sent_prompt_tokens"],
                  spend["sent_completion_tokens"]),
                 ("replayed from the journal (not paid again)", spend["requests_replayed"],
                  spend["replayed_prompt_tokens"], spend["replayed_completion_tokens"]),
                 ("held by the journal (paid for in this folder)", journal.get("requests", 0),
                  journal.get("prompt_tokens", 0), journal.get("completion_tokens", 0))]
    body = "".join(f"<tr><td>{_e(what)}</td><td>{n:,}</td><td>{p:,}</td><td>{c:,}</td><td>{cost(p, c)}</td></tr>"
                   for what, n, p, c in rows)
    prices = (f"<p>At ${price_in}/M prompt and ${price_out}/M completion tokens.</p>" if price_in or price_out else
              "<p>No price set: teacher.price_input_per_m and price_output_per_m, or `reflectune report "
              "--price-in/--price-out`.</p>")
    return ("<table><tr><th></th><th>requests</th><th>prompt tokens</th><th>completion tokens</th><th>cost</th></tr>"
            + body + "</table>" + prices)


def _rewrites(decisions: pl.DataFrame, k: int = 5) -> str:
    needed = {"orig_ifd_ppl", "ins_res_ifd_ppl"}
    if not needed <= set(decisions.columns):
        return "<p>No rewrites scored.</p>"
    # a rewrite that fell back is the original pair again: only usable ones are shown
    usable = pl.col("ins_res_parse_status") == "ok" if "ins_res_parse_status" in decisions.columns else pl.lit(True)
    scored = decisions.filter(pl.col("orig_ifd_ppl").is_finite() & pl.col("ins_res_ifd_ppl").is_finite() & usable
                              ).with_columns(change=pl.col("ins_res_ifd_ppl") - pl.col("orig_ifd_ppl")
                                             ).sort("change", descending=True)
    if not scored.height:
        return "<p>No usable rewrite has both scores.</p>"

    def table(rows: pl.DataFrame, title: str) -> str:
        body = "".join(
            f"<tr><td>{r['change']:+.3f}<br>{r['orig_ifd_ppl']:.3f} &rarr; {r['ins_res_ifd_ppl']:.3f}</td>"
            f"<td class='pair'><b>{_e(r['orig_instruction'])}</b>\n{_e(r['orig_output'])}</td>"
            f"<td class='pair'><b>{_e(r['ins_res_instruction'])}</b>\n{_e(r['ins_res_output'])}</td></tr>"
            for r in rows.iter_rows(named=True))
        return (f"<h3>{title}</h3><table><tr><th>IFD change</th><th>original</th><th>rewrite (ins_res)</th></tr>"
                f"{body}</table>")

    rest = scored.slice(k)  # the least helpful are never the ones already shown as most helpful
    least = table(rest.tail(k).reverse(), "Least helpful") if rest.height else \
        "<h3>Least helpful</h3><p>All scored rewrites are shown above.</p>"
    return table(scored.head(k), "Most helpful") + least


def _evaluation(ev: dict[str, Any]) -> str:
    """The table (one row per baseline and test set) and its plot: winning score per row, with
    the parity line at 1."""
    def loss(x):
        return f"{x:.3f}" if isinstance(x, float) else "n/a"

    rows = ev.get("table") or []
    body = "".join(
        f"<tr><td>{_e(r['baseline'])}</td><td>{_e(r['test_set'])}</td><td>{r['n']}</td><td>{r['wins']}</td>"
        f"<td>{r['ties']}</td><td>{r['losses']}</td><td>{r['winning_score']:.3f}</td>"
        f"<td>{loss(r.get('heldout_loss_model'))}</td><td>{loss(r.get('heldout_loss_baseline'))}</td></tr>"
        for r in rows)
    return (f"<p>{_e(ev['model'])}, trained on the selected data, against a student trained on each baseline's "
            f"original pairs (random: as many, sampled; length: as many, the longest responses; ifd: as many, by "
            f"Cherry's IFD rule; full: all), judged by {_e(ev['judge'])} in both orders.</p>"
            f"<table><tr><th>baseline</th><th>test set</th><th>n</th><th>wins</th><th>ties</th><th>losses</th>"
            f"<th>winning score</th><th>held-out loss (selected)</th><th>held-out loss (baseline)</th></tr>"
            f"{body}</table>" + _winning_scores(rows))


def compare_text(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Finished runs' evaluations side by side: one line per run, baseline and test set."""
    width = max(len(label) for label, _ in runs)
    lines = [f"{'run':<{width}}  {'baseline':<9} {'test set':<22} {'n':>4} {'wins':>5} {'ties':>5} {'losses':>6} "
             f"{'score':>6}"]
    for label, summary in runs:
        lines += [f"{label:<{width}}  {r['baseline']:<9} {r['test_set']:<22} {r['n']:>4} {r['wins']:>5} {r['ties']:>5} "
                  f"{r['losses']:>6} {r['winning_score']:>6.3f}" for r in summary["table"]]
    return "\n".join(lines)


def compare_page(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One HTML page of the runs' evaluations: each run's table and plot of winning scores."""
    parts = [f"<h2>{_e(label)}</h2>" + _evaluation(summary) for label, summary in runs]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Reflectune: evaluations compared</title>"
            f"<style>{STYLE}</style></head><body><h1>Evaluations compared</h1>{''.join(parts)}</body></html>")


def _winning_scores(rows: list[dict[str, Any]]) -> str:
    """A bar per baseline and test set from 0 to its winning score (0 to 2), the parity line at 1."""
    if not rows:
        return ""
    w, row, left = 560, 26, 200
    h = row * len(rows) + 40
    x = lambda score: left + min(max(score, 0.0), 2.0) / 2.0 * (w - left - 20)
    bars = "".join(
        f"<text x='4' y='{14 + i * row + 12}' font-size='12'>{_e(r['baseline'])} / {_e(r['test_set'])}</text>"
        f"<rect x='{left}' y='{14 + i * row}' width='{x(r['winning_score']) - left:.1f}' height='{row - 8}' "
        f"fill='{'#54a24b' if r['winning_score'] > 1 else '#e45756' if r['winning_score'] < 1 else '#bbbbbb'}'/>"
        f"<text x='{x(r['winning_score']) + 4:.1f}' y='{14 + i * row + 12}' font-size='11'>{r['winning_score']:.2f}</text>"
        for i, r in enumerate(rows))
    parity = x(1.0)
    return (f"<svg class='plot' width='{w}' height='{h}' viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>"
            f"{bars}<line x1='{parity:.1f}' y1='6' x2='{parity:.1f}' y2='{h - 20}' stroke='#d62728' "
            f"stroke-dasharray='5'/><text x='{parity:.1f}' y='{h - 6}' text-anchor='middle' font-size='11'>"
            "parity (winning score 1)</text></svg>")
