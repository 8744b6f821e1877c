"""Perturbation radii as exact fractions: ``8/255`` stays ``8/255`` (text) beside its float, so 8/255 and 0.031 never
mix in a leaderboard key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Eps", "parse_eps", "eps_text", "EpsError"]


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
    """Read a radius: ``'8/255'``, ``'0.031'``, ``0.5``, ``2``, a ``Fraction``.

    The text depends only on the exact value, so one radius has one text whatever way it was written: ``k/255``
    when 255 times the value is an integer (``'16/510'`` -> ``'8/255'``, ``'48/255'`` stays), else a terminating
    decimal of at most 8 places (``'1/2'`` -> ``'0.5'``, ``'0.0310'`` -> ``'0.031'``), else the reduced fraction
    (``'1/7'``). Python floats are read through ``repr`` (``0.1`` -> ``'0.1'``). Negative, non-finite or malformed
    values are errors.
    """
    if isinstance(spec, Eps):
        return spec
    bad = f"eps {spec!r} is not a number; write it as a fraction like 8/255 or a decimal like 0.5."
    if isinstance(spec, bool) or spec is None:
        raise EpsError(bad)
    if isinstance(spec, Fraction):
        value = spec
    elif isinstance(spec, int):
        value = Fraction(spec)
    elif isinstance(spec, float):
        if not math.isfinite(spec):
            raise EpsError(f"eps {spec!r} is not finite.")
        value = Fraction(repr(spec))
    elif isinstance(spec, str):
        s = spec.strip()
        try:
            if "/" in s:
                num, _, den = s.partition("/")
                n, d = Fraction(num.strip()), Fraction(den.strip())
                if d == 0:
                    raise EpsError(f"eps {spec!r} divides by zero.")
                value = n / d
            else:
                value = Fraction(s)
        except EpsError:
            raise
        except (ValueError, ZeroDivisionError):
            raise EpsError(bad) from None
    else:
        raise EpsError(bad)
    if value < 0:
        raise EpsError(f"eps {spec!r} is negative.")
    return Eps(value, eps_text(value))


def eps_text(value: Fraction) -> str:
    """The canonical text of an exact radius (see :func:`parse_eps`)."""
    if value.denominator == 1:
        return str(value.numerator)
    if (value * 255).denominator == 1:
        return f"{value * 255}/255"
    d = value.denominator
    twos = fives = 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    places = max(twos, fives)
    if d == 1 and places <= 8:
        scaled = value * 10 ** places
        text = f"{scaled.numerator // 10 ** places}.{scaled.numerator % 10 ** places:0{places}d}"
        return text.rstrip("0").rstrip(".")
    return f"{value.numerator}/{value.denominator}"
