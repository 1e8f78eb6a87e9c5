"""app/percentile.py: the nearest-rank rule."""

from __future__ import annotations

import pytest

from app.percentile import nearest_rank


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([5.0], 0.99, 5.0),
        ([5.0], 0.01, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0.51, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),
        ([1.0, 2.0], 0.99, 2.0),
        ([float(i) for i in range(1, 101)], 0.07, 7.0),  # 0.07 * 100 is 7.000000000000001
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
        ([float(i) for i in range(1, 1001)], 0.999, 999.0),
    ],
)
def test_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert nearest_rank(values, q) == expected
