"""Numeric fingerprints of parsed answers: a cheap proof that math-verify would call two answers unequal.

A fingerprint is ``(kind, values)``; two answers whose fingerprints are both known, of the same kind, and
differ are not equal, so ``verify`` (tens to hundreds of ms for sets and equations) is skipped. Free
symbols are set to fixed irrational-ish values that depend on the symbol's name.

- ``values``: an expression's value, or the sorted values of a set's elements, an interval's end points,
  of the interval a one-variable relation describes (``0 < x < 1``), or of ``x \\in S``. math-verify equates sets and
  intervals only element by element (a value equals its one-element set), so different multisets of
  values mean different answers.
- ``equation``: the free symbols of ``lhs - rhs`` and its values at three points divided by the first.
  math-verify equates two equations when ``lhs - rhs`` agree up to sign, or when their solutions do; the
  fingerprint is exact for the first and for equations that are multiples of each other, and calls
  equations with equal solutions that are not multiples (``y/x = 2`` and ``y = 2x``) unequal: a missed
  match, never a false one.
- None (no shortcut): a symbol or a product of symbols (math-verify compares those by name: ``\\text{10}``
  equals 10), anything that does not evaluate to numbers, chains of equations.
"""

from __future__ import annotations

import cmath
from typing import Any

Fingerprint = tuple[str, tuple]

_POINTS = (0.0, 0.3183098862, 0.7071067812)
_TOLERANCE = 1e-6


def _value(expr: Any, shift: float = 0.0) -> complex:
    substitutions = {s: 0.5772156649 + 0.1 * (sum(map(ord, str(s))) % 97) + shift for s in expr.free_symbols}
    value = complex(expr.subs(substitutions).evalf() if substitutions else expr.evalf())
    if cmath.isnan(value):
        raise ValueError("no value")
    return value


def _constant_values(items: Any) -> tuple[complex, ...]:
    values = []
    for item in items:
        if getattr(item, "free_symbols", True):
            raise ValueError("symbolic element")
        values.append(complex(item.evalf()))
    return tuple(sorted(values, key=lambda v: (v.real, v.imag)))


def fingerprint(expr: Any) -> Fingerprint | None:
    """The fingerprint of one parsed answer (math-verify's first parse result), or None."""
    from latex2sympy2_extended.logic import And
    from math_verify.grader import unwrap_fcs
    from sympy import E, Eq, FiniteSet, Interval, Mul, Set, Symbol, Tuple
    from sympy.core.relational import Relational

    try:
        if isinstance(expr, Symbol) or isinstance(expr, Mul) and all(isinstance(a, Symbol) or a == E for a in expr.args):
            return None
        if isinstance(expr, Eq) and isinstance(expr.lhs, Symbol) and isinstance(expr.rhs, Set):
            expr = expr.rhs  # x \\in (0, 1): math-verify compares the set (an equation never equals a set)
        elif isinstance(expr, Eq):
            difference = expr.lhs - expr.rhs
            values = [_value(difference, shift) for shift in _POINTS]
            if abs(values[0]) < _TOLERANCE:
                return None
            names = tuple(sorted(str(s) for s in difference.free_symbols))
            return "equation", (names, tuple(v / values[0] for v in values[1:]))
        if isinstance(expr, (Relational, And)):
            expr = unwrap_fcs(expr).as_set()
        if isinstance(expr, Interval):
            return "values", _constant_values((expr.start, expr.end))
        if isinstance(expr, (FiniteSet, Tuple)):
            return "values", _constant_values(expr.args)
        if hasattr(expr, "free_symbols") and not isinstance(expr, (Relational, And)):
            return "values", (_value(expr),)
    except Exception:  # noqa: BLE001  matrices, unevaluable or unsolvable forms: no shortcut
        return None
    return None


def _close(a: complex, b: complex) -> bool:
    return abs(a - b) <= _TOLERANCE * max(1.0, abs(a), abs(b)) or (cmath.isinf(a) and a == b)


def differ(a: Fingerprint | None, b: Fingerprint | None) -> bool:
    """True when the two fingerprints prove the answers unequal."""
    if a is None or b is None or a[0] != b[0]:
        return False
    if a[0] == "equation":
        (names_a, ratios_a), (names_b, ratios_b) = a[1], b[1]
        return names_a != names_b or not all(_close(x, y) for x, y in zip(ratios_a, ratios_b, strict=True))
    return len(a[1]) != len(b[1]) or not all(_close(x, y) for x, y in zip(a[1], b[1], strict=True))
