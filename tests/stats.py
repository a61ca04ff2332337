"""Agreement measures used by parity tests."""

from __future__ import annotations

import math

import numpy as np
import polars as pl


def spearman(a: list[float], b: list[float]) -> float:
    ra = pl.Series(a).rank("average").to_numpy()
    rb = pl.Series(b).rank("average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def median_relative_difference(reference: list[float], other: list[float]) -> float:
    diffs = sorted(abs(x - y) / abs(x) for x, y in zip(reference, other) if not math.isnan(x))
    return float(np.median(diffs))
