# ruff: noqa: RUF001 - the Markdown output uses typographic signs (times, en dash) on purpose
"""Small statistics helpers (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round `r` (from 0) in interleaved rounds: rotated by one each round, and
    reversed in odd rounds, so that two neighbours run in both orders. Rotation alone keeps
    each target behind the same one in almost every round, and a paired ratio of those two
    then carries whatever the first run leaves to the second (a warm page cache, a CPU
    still clocked up, its dying processes' last work): 3 of 3 rounds in one order.
    """
    if not names:
        return []
    k = r % len(names)
    order = list(names[k:]) + list(names[:k])
    return order[::-1] if r % 2 else order


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; q in [0, 100]."""
    if not sorted_values:
        return math.nan
    if q <= 0:
        return sorted_values[0]
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}"
