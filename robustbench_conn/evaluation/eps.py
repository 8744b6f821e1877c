"""Perturbation radii as exact fractions: ``8/255`` stays ``8/255`` (text) beside its float, so 8/255 and 0.031 never
mix in a leaderboard key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Eps", "parse_eps", "EpsError"]


class EpsError(ValueError):
    """An eps that cannot be read; the message says what to write instead."""


@dataclass(frozen=True, order=True)
class Eps:
    """A radius: ``value`` (the exact fraction), ``text`` (canonical, e.g. ``'8/255'``, ``'0.5'``, ``'0'``)."""

    value: Fraction
    text: str

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        return self.text


def parse_eps(spec) -> Eps:
    """``'8/255'`` -> Eps(8/255, '8/255'); ``'0.031'`` -> Eps(31/1000, '0.031'); ``2`` -> Eps(2, '2').

    Fractions are reduced (``'16/510'`` -> ``'8/255'``); decimals keep their decimal text; floats given as Python
    floats are read through ``repr`` (``0.5`` -> ``'0.5'``). Negative, non-finite or malformed values are errors.
    """
    if isinstance(spec, Eps):
        return spec
    if isinstance(spec, bool):
        raise EpsError(f"eps {spec!r} is not a number; write it as a fraction like 8/255 or a decimal like 0.5.")
    if isinstance(spec, Fraction):
        value = spec
        text = _fraction_text(value)
    elif isinstance(spec, int):
        value, text = Fraction(spec), str(spec)
    elif isinstance(spec, float):
        if not math.isfinite(spec):
            raise EpsError(f"eps {spec!r} is not finite.")
        text = repr(spec)
        value = Fraction(text)
        text = _decimal_text(text)
    elif isinstance(spec, str):
        s = spec.strip()
        if "/" in s:
            num, _, den = s.partition("/")
            try:
                n, d = Fraction(num.strip()), Fraction(den.strip())
            except (ValueError, ZeroDivisionError):
                raise EpsError(f"eps {spec!r} is not a fraction like 8/255.") from None
            if d == 0:
                raise EpsError(f"eps {spec!r} divides by zero.")
            value = n / d
            text = _fraction_text(value)
        else:
            try:
                value = Fraction(s)
            except (ValueError, ZeroDivisionError):
                raise EpsError(f"eps {spec!r} is not a number; write it as a fraction like 8/255 or a decimal "
                               "like 0.5.") from None
            text = _decimal_text(s)
    else:
        raise EpsError(f"eps {spec!r} is not a number; write it as a fraction like 8/255 or a decimal like 0.5.")
    if value < 0:
        raise EpsError(f"eps {spec!r} is negative.")
    return Eps(value, text)


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _decimal_text(text: str) -> str:
    """A decimal's canonical text: no sign, no trailing zeros (``'0.50'`` -> ``'0.5'``, ``'1.0'`` -> ``'1'``)."""
    value = Fraction(text)
    if value.denominator == 1:
        return str(value.numerator)
    t = text.strip().lstrip("+")
    if "e" in t.lower():
        return _fraction_text(value) if len(_fraction_text(value)) < 12 else format(float(value), ".17g")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    if t.startswith("."):
        t = "0" + t
    return t
