"""The exact fast path (``exact_forms``): what it reads, and that its verdicts are the math-verify path's.

Two differential tests on generated answers (``latex_generator``; derandomized: the same on every run,
``MMUPT_EXACT_EXAMPLES=3000`` runs a longer search):
- reading: whenever ``exact_form`` reads an answer, math-verify's own parse of ``$answer$`` is the same
  value (at a random point), the same equation (lhs - rhs) or the same set;
- verdicts: whenever ``decide`` gives a verdict on a pair, the math-verify path
  (``AnswerMatcher._decide_math_verify``: math-verify both ways, the equation rule, the fingerprints) gives
  the same one.
"""

from __future__ import annotations

import math
import os
import random
import re

import mpmath
import pytest

from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.algorithms.exact_forms import (
    Equation,
    Membership,
    RealSet,
    Scalar,
    decide,
    exact_form,
    same_set,
)
from tests.algorithms.latex_generator import answer, family

_EXAMPLES = int(os.environ.get("MMUPT_EXACT_EXAMPLES", "300"))


def _mp(poly: dict, values: dict[str, float]) -> mpmath.mpf:
    total = mpmath.mpf(0)
    for (radicand, pi_power, exps), c in poly.items():
        term = mpmath.mpf(c.numerator) / c.denominator * mpmath.sqrt(radicand) * mpmath.pi**pi_power
        for name, e in exps:
            term *= mpmath.mpf(values[name]) ** e
        total += term
    return total


def _value(rf, values: dict[str, float]) -> complex:
    with mpmath.workdps(50):
        return complex(_mp(rf.num, values) / _mp(rf.den, values))


def _point(names: set[str]) -> dict[str, float]:
    return {n: 0.37 + 0.113 * len(n) + 0.0071 * sum(map(ord, n)) + 0.61 * (sum(map(ord, n)) % 7) for n in names}


def _same_reading(text: str, form) -> bool:
    from math_verify import parse
    from math_verify.grader import unwrap_fcs
    from sympy import Eq, Interval

    parsed = parse(f"${text}$")
    expr = parsed[0] if parsed else None
    if isinstance(form, Scalar):
        values = _point({str(s) for s in expr.free_symbols} | set(form.value.symbols))
        theirs = complex(expr.subs({s: values[str(s)] for s in expr.free_symbols}).evalf(30))
        ours = _value(form.value, values)
        return abs(theirs - ours) <= 1e-9 * max(1.0, abs(ours))
    if isinstance(form, Equation):
        if not isinstance(expr, Eq):
            return False
        difference = expr.lhs - expr.rhs
        values = _point({str(s) for s in difference.free_symbols} | set(form.difference.symbols))
        theirs = complex(difference.subs({s: values[str(s)] for s in difference.free_symbols}).evalf(30))
        ours = _value(form.difference, values)
        kind = expr.lhs.is_Symbol and expr.lhs not in expr.rhs.free_symbols
        return abs(theirs - ours) <= 1e-9 * max(1.0, abs(ours)) and kind == form.assignment
    if isinstance(form, Membership):
        return (isinstance(expr, Eq) and str(expr.lhs) == form.variable and isinstance(expr.rhs, Interval)
                and _same_reading(re.split(r"\\in(?![a-z])|=", text, maxsplit=1)[1].strip(), form.interval))
    interval = expr if isinstance(expr, Interval) else unwrap_fcs(expr).as_set()
    low = -math.inf if form.low is None else _value(form.low, {}).real
    high = math.inf if form.high is None else _value(form.high, {}).real
    return (isinstance(interval, Interval) and math.isclose(float(interval.start), low) and math.isclose(float(interval.end), high)
            and interval.left_open == form.low_open and interval.right_open == form.high_open
            and (form.relation is None) == isinstance(expr, Interval))


@pytest.mark.slow  # ~15 s on 2 cores
def test_exact_reading_is_math_verifys_reading():
    rng = random.Random(20240601)
    read = 0
    for _ in range(_EXAMPLES * 3):
        text = answer(rng)
        form = exact_form(text)
        if form is None:
            continue
        read += 1
        assert _same_reading(text, form), f"{text!r}: read {form}"
    assert read > _EXAMPLES // 2  # the grammar reads a good share of what is generated


@pytest.mark.slow  # ~30 s on 2 cores
def test_fast_verdicts_are_the_math_verify_paths():
    rng = random.Random(20240602)
    reference = AnswerMatcher(timeout_s=0, exact_fast_path=False)
    matcher = AnswerMatcher(timeout_s=0)
    decided = 0
    for _ in range(_EXAMPLES * 2):
        a, b = rng.sample(family(rng), 2)
        verdict = decide(matcher._exact_form(a), matcher._exact_form(b))
        if verdict is None:
            continue
        decided += 1
        pair = (a, b) if a <= b else (b, a)
        assert verdict == reference._decide_math_verify(*pair), f"{a!r} vs {b!r}: fast says {verdict}"
    assert decided > _EXAMPLES // 2
    assert reference.num_timeouts == 0


@pytest.mark.parametrize(
    ("text", "kind"),
    [(r"3\sqrt{2}", Scalar), (r"\frac{6}{\sqrt{2}}", Scalar), (r"2^{1/2}", Scalar), (r"\frac{\pi}{2}", Scalar),
     (r"\frac{x+1}{x-1}", Scalar), ("1/2x", Scalar), (r"\sqrt{7} 3", Scalar), ("4ab", Scalar), ("y = 2x + 3", Equation),
     ("2x - y + 3 = 0", Equation), ("(1, 5)", RealSet), (r"[-\sqrt{2}, \infty)", RealSet), ("1 < x < 5", RealSet),
     (r"x \ge 3", RealSet), ("0.5", Scalar), (r"x \in (1, 5)", Membership), ("t = [0, 1)", Membership)],
)
def test_reads_the_common_forms(text, kind):
    assert isinstance(exact_form(text), kind)


@pytest.mark.parametrize(
    "text",
    ["2 3", "2(3)", r"2\frac{1}{2}", r"\frac61 3", "x 2 10", "x - t", "4 pct", r"\sin x", "e", "i", "x_1", "|x|",
     "x^23", r"\sqrt x", "x^{1/2}", r"8^{1/3}", "0.5x", "(2, 1)", "[1, 1]", r"[3, \infty]", "5 < x < 1", "x = x",
     "1, 2", r"\{1, 2\}", r"{8/8}", "1 < x > 0", r"x \in \{0, 1\}", "x = y = 3", r"x^{100}"],
)
def test_leaves_the_rest_to_math_verify(text):
    """Forms latex2sympy or math-verify's normalization read their own way (``2 3`` is 5, ``2\\frac{1}{2}``
    is 5/2, ``x - t`` loses its "unit" and ends in a minus; ``4ab`` loses its unit "ab" and is read as 4, as
    math-verify reads it), and forms outside the grammar."""
    assert exact_form(text) is None


@pytest.mark.parametrize(
    ("a", "b", "verdict"),
    [(r"3\sqrt{2}", r"\sqrt{18}", True), (r"\frac{6}{\sqrt{2}}", r"3 \cdot \sqrt{2}", True), (r"2^{1/2}", r"\sqrt2", True),
     (r"3\sqrt{2}", r"2\sqrt{3}", False), (r"\frac{x^2-1}{x-1}", "x+1", True), ("x + 1", "x + 2", False),
     ("y = 2x + 3", "2x - y + 3 = 0", True), ("y = 2x + 3", "y - 3 = 2x", True), ("y = x + 3", "x - y + 2 = 0", False),
     ("2y = 4x + 6", "y = 2x + 3", None), ("x + y = 1", "1", False), ("y = 2x + 3", "2x + 3", None),
     ("(1, 5)", "1 < x < 5", True), ("(1, 5)", "(2, 5)", False), ("(1, 5)", "[1, 5]", False), ("(1, 5]", r"1 < x \le 5", True),
     ("1 < x < 5", "5 > x > 1", None), (r"(3, \infty)", "x > 3", True), ("x", "y", None), ("x", r"\frac{2x}{2}", None),
     ("0.25", r"\frac{1}{4}", None), ("0.5", r"\frac{1}{2}", True), ("0.5", r"\frac{\sqrt{2}}{2}", False),
     (r"x \in (1, 5)", "y = 2x + 3", False), (r"x \in (1, 5)", r"y \in (1, 5)", False), (r"x \in (1, 5)", "x = (1, 5)", None), ("(1, 5)", "3", False)],
)
def test_verdicts(a, b, verdict):
    """None: the math-verify path decides (a symbol against anything: math-verify compares names; equations
    that are multiples; one inequality in other words; a decimal against an exact value that is close).
    ``0.5`` is 1/2 exactly: math-verify's normalization rewrites it so."""
    assert decide(exact_form(a), exact_form(b)) is verdict
    assert decide(exact_form(b), exact_form(a)) is verdict


def test_same_set_needs_the_same_variable_and_set():
    assert same_set(exact_form("5 > x > 1"), exact_form("1 < x < 5"))
    assert not same_set(exact_form("5 > y > 1"), exact_form("1 < x < 5"))
    assert not same_set(exact_form(r"5 \ge x > 1"), exact_form("1 < x < 5"))
    assert not same_set(exact_form("(1, 5)"), exact_form("1 < x < 5"))  # an interval is math-verify's business


def test_fast_path_spares_math_verify():
    matcher = AnswerMatcher()
    answers = [r"3\sqrt{2}", r"\sqrt{18}", r"\frac{6}{\sqrt{2}}", r"2\sqrt{3}", "y = 2x + 3", "2x - y + 3 = 0", "(1, 5)",
               "1 < x < 5", r"x \in (1, 5)", "(2, 5)"]
    ids = matcher.cluster(answers)
    assert ids[0] == ids[1] == ids[2] != ids[3] and ids[4] == ids[5] and ids[6] == ids[7] == ids[8] != ids[9]
    assert matcher.num_symbolic_calls == 0 and matcher.num_fast_decisions > 0
    reference = AnswerMatcher(exact_fast_path=False)
    assert reference.cluster(answers) == ids and reference.num_symbolic_calls > 0
