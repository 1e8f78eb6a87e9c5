"""The one percentile rule for every figure kvroute shows (metrics, dashboard, benches).

Nearest rank: the p-th percentile of n sorted values is the smallest value with at least p% of
the values at or below it, the value at rank ceil(p/100 * n). It is always one of the values,
never an interpolation, so a p99 of few samples is a latency that happened.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

# ceil() of a product that floating point puts a hair above an integer (0.07 * 100) must not
# skip a rank.
_ROUNDING = 1e-9


def nearest_rank(ordered: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of ascending ``ordered`` values; None when there are none."""
    if not ordered:
        return None
    rank = math.ceil(q * len(ordered) - _ROUNDING)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def percentiles(samples: Collection[float]) -> dict[str, float | None]:
    """p50, p90 and p99 of a window of samples (rounded to 3 places), and how many there are."""
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        value = nearest_rank(ordered, q)
        assert value is not None
        return round(value, 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "count": len(ordered)}
