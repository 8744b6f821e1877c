"""The statistics the benchmarks report (benchmarks/_common.py is a script helper, imported by path)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import median_interval  # noqa: E402


def _coverage(n: int, k: int) -> float:
    """P(X_(k) <= median <= X_(n+1-k)) for n draws of a continuous variable."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n


@pytest.mark.parametrize("n", range(1, 40))
def test_median_interval_is_the_narrowest_order_statistic_pair_with_95_percent_coverage(n):
    values = [float(v) for v in range(n, 0, -1)]   # unsorted on purpose: the i-th order statistic is i
    interval = median_interval(values)
    if interval is None:
        assert _coverage(n, 1) < 0.95           # not even (min, max) covers 95%
        return
    k = int(interval[0])
    assert interval == (k, n + 1 - k)
    assert _coverage(n, k) >= 0.95 and (k + 1 > n // 2 or _coverage(n, k + 1) < 0.95)
    assert interval[0] <= sorted(values)[(n - 1) // 2] <= interval[1]
