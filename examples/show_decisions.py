"""The first decisions of a finished recycle run, read with the library: which branch each
pair took and which form of it was kept. `make demo` ends with it (the command line has
already printed the run's summary and its evaluation).

    python examples/show_decisions.py out/demo
"""

from __future__ import annotations

import sys

import polars as pl

from reflectune import io
from reflectune.run_folder import RunFolder


def main(out: str) -> None:
    decisions = io.read_parquet(RunFolder(out).decisions)
    with pl.Config(tbl_rows=10, fmt_str_lengths=48, tbl_width_chars=160):
        print(decisions.select("source_index", "orig_instruction", "orig_ifd_ppl", "orig_rifd_ppl", "branch", "chosen")
              .head(10))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
