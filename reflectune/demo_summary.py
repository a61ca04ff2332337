"""Print what a recycle run produced: counts, branches, and a few decisions."""

from __future__ import annotations

import sys

import polars as pl

from reflectune import io


def main(out: str) -> None:
    manifest = io.read_json(io.join(out, "manifest.json"))
    c = manifest["counts"]
    print(f"\nRun {out}: teacher {manifest['teacher']}, student {manifest['student']}, {manifest['seconds']:.0f}s")
    print(f"input {c['input_rows']} = valid {c['valid_rows']} + rejected {c['rejected_rows']}; "
          f"valid {c['valid_rows']} = selected {c['selected_rows']} + dropped {c['dropped_rows']}")
    print("branches:", c["per_branch"], " selected variants:", c["per_variant"])
    rewrites = sum(n for v, n in c["per_variant"].items() if v != "orig")
    print(f"selected rewrites: {rewrites} of {c['selected_rows']} selected samples "
          f"({', '.join(f'{v} {n}' for v, n in sorted(c['per_variant'].items()) if v != 'orig') or 'none'})")
    print("teacher tokens:", manifest["token_usage"])
    print("teacher parse rates per variant (ok = every field usable; degenerate = closed but a loop):")
    for variant, counts in parse_rates(out).items():
        total = sum(counts.values())
        print(f"  {variant:8s} " + "  ".join(f"{status} {n}/{total} ({n / total:.0%})" for status, n in counts.items()))
    t = manifest["training"]
    if t.get("trained"):
        print(f"training: {t['rows']} rows, {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}")
    decisions = io.read_parquet(io.join(out, "decisions.parquet"))
    with pl.Config(tbl_rows=10, fmt_str_lengths=48, tbl_width_chars=160):
        print(decisions.select("source_index", "orig_instruction", "orig_ifd_ppl", "orig_rifd_ppl", "branch", "chosen")
              .head(10))
    if manifest.get("report"):
        print(f"report: {manifest['report']}")
    ev = manifest.get("evaluation", {})
    if ev.get("evaluated"):
        from reflectune.evaluation import render_table

        print("\n" + render_table(ev))
    else:
        print(f"\nevaluation: {ev.get('reason', 'not run')}")


def parse_rates(out: str) -> dict[str, dict[str, int]]:
    """Parse status counts per variant over the run's teacher outputs."""
    files = io.ls(io.join(out, "variants"), (".parquet",))
    if not files:
        return {}
    variants = pl.concat([io.read_parquet(f) for f in files])
    order = ["ok", "degenerate", "partial", "fallback"]
    rates: dict[str, dict[str, int]] = {}
    for variant, status, n in variants.group_by("variant", "parse_status").len().iter_rows():
        rates.setdefault(variant, {})[status] = n
    return {v: {s: rates[v][s] for s in order if s in rates[v]} for v in ("ins", "res", "ins_res") if v in rates}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
