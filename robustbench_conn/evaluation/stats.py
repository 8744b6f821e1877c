"""Binomial confidence intervals for an accuracy ``k / n``."""
from __future__ import annotations

import math

__all__ = ["binomial_interval", "clopper_pearson", "wilson"]


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval: beta quantiles; conservative, never narrower than the nominal level."""
    _check(k, n, confidence)
    from scipy.stats import beta

    a = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return low, high


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval."""
    _check(k, n, confidence)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, min(p, centre - half))
    high = 1.0 if k == n else min(1.0, max(p, centre + half))
    return low, high


def binomial_interval(k: int, n: int, method: str = "clopper-pearson",
                      confidence: float = 0.95) -> tuple[float, float]:
    if method == "clopper-pearson":
        return clopper_pearson(k, n, confidence)
    if method == "wilson":
        return wilson(k, n, confidence)
    raise ValueError(f"interval method {method!r} is unknown: use 'clopper-pearson' or 'wilson'.")


def _check(k: int, n: int, confidence: float) -> None:
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
