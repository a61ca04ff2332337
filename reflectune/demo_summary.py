"""Print what a recycle run produced: the run's summary, a few decisions and the evaluation."""

from __future__ import annotations

import sys

import polars as pl

from reflectune import io
from reflectune import manifest as run


def main(out: str) -> None:
    manifest = io.read_json(io.join(out, "manifest.json"))
    print("\n" + run.text(manifest))
    decisions = io.read_parquet(io.join(out, "decisions.parquet"))
    with pl.Config(tbl_rows=10, fmt_str_lengths=48, tbl_width_chars=160):
        print(decisions.select("source_index", "orig_instruction", "orig_ifd_ppl", "orig_rifd_ppl", "branch", "chosen")
              .head(10))
    ev = manifest.get("evaluation", {})
    if ev.get("evaluated"):
        from reflectune.evaluation import render_table

        print("\n" + render_table(ev))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
