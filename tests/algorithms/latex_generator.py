"""Random LaTeX answers for the exact fast path's tests: a grammar of the common symbolic forms, with the
constructs latex2sympy and math-verify's normalization read their own way mixed in (``2(3)``, ``1/2x``,
``\\frac61 3``, ``x - t``: a trailing "unit", ``e``, ``i``, ``\\sin x``...).

``answer(rng)``: one answer (scalar, equation, interval or inequality); ``family(rng)``: answers that
state one value in many words, with near misses, so that pairs drawn from a family are often equal.
Derandomized by the caller's ``random.Random(seed)``.
"""

from __future__ import annotations

import random

LETTERS = [*"abcxyzknprtABXY", r"\theta", r"\alpha"]
_TRAPS = ["2(3)", "(2)(3)", "2 3", "x2", "x(x+1)", "2(x+1)", r"\pi(2)", "1/2x", "x/2y", "2x/3", r"\sqrt12", r"\frac123",
          "0.5x", "x_1", "e", "i", "E", "I", r"\sin x", "|x|", "x!", "-(x+1)", "2^3^2", r"2\frac{1}{2}", r"\frac61 3",
          "x 2 10", "2(+1)", r"{8/8}", "ab", "4 pct", "x - t", r"\sqrt x", "2^{x}", "x^{1/2}"]


def _atom(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if depth > 2 or r < 0.3:
        return str(rng.randint(0, 12))
    if r < 0.5:
        return rng.choice(LETTERS)
    if r < 0.55:
        return r"\pi"
    if r < 0.63:
        return rng.choice([rf"\sqrt{{{rng.randint(0, 50)}}}", rf"\sqrt{rng.randint(0, 9)}", rf"\sqrt {rng.randint(2, 9)}",
                           rf"\sqrt{{\frac{{{rng.randint(1, 9)}}}{{{rng.randint(1, 9)}}}}}"])
    if r < 0.72:
        return rng.choice([rf"\frac{{{expr(rng, depth + 1)}}}{{{expr(rng, depth + 1)}}}",
                           rf"\frac{rng.randint(1, 9)}{rng.randint(1, 9)}"])
    if r < 0.8:
        return f"({expr(rng, depth + 1)})"
    if r < 0.9:
        base = rng.choice([str(rng.randint(1, 9)), rng.choice(LETTERS), f"({expr(rng, depth + 1)})", r"\sqrt{2}"])
        return base + rng.choice(["^2", "^{3}", "^{-1}", "^{1/2}", "^{\\frac{1}{2}}", "^0", "^-1", "^23", "^{10}"])
    return rng.choice(_TRAPS)


def _term(rng: random.Random, depth: int) -> str:
    out = _atom(rng, depth)
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        out += rng.choice(["", " ", r"\cdot ", r"\times ", "*", "/", " / "]) + _atom(rng, depth)
    return out


def expr(rng: random.Random, depth: int = 0) -> str:
    out = rng.choice(["", "", "", "-", "+"]) + _term(rng, depth)
    for _ in range(rng.choice([0, 1, 1, 2])):
        out += rng.choice([" + ", "-", " - ", "+-", " - -"]) + _term(rng, depth)
    return out


def _const(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(-9, 9)), rf"\sqrt{{{rng.randint(1, 20)}}}", rf"-\frac{{{rng.randint(1, 9)}}}{{{rng.randint(1, 9)}}}",
                       rf"\frac{{\pi}}{{{rng.randint(1, 6)}}}", r"2\sqrt{3}", r"\infty", r"-\infty"])


def answer(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return expr(rng)
    if r < 0.7:
        return f"{expr(rng)} = {expr(rng)}" if rng.random() < 0.5 else f"{rng.choice(LETTERS)} = {expr(rng)}"
    if r < 0.85:
        interval = f"{rng.choice('([')}{_const(rng)}, {_const(rng)}{rng.choice(')]')}"
        relation = rng.choice(["=", "\\in"])
        return interval if rng.random() < 0.7 else f"{rng.choice(LETTERS)} {relation} {interval}"
    v = rng.choice(["x", "y", "t", r"\theta"])
    ops = ["<", r"\le", r"\leq", ">", r"\ge", r"\geq"]
    if rng.random() < 0.5:
        a, b = sorted([rng.randint(-9, 9), rng.randint(-9, 9)])
        up = rng.random() < 0.5
        o1, o2 = rng.choice(ops[:3] if up else ops[3:]), rng.choice(ops[:3] if up else ops[3:])
        return f"{a} {o1} {v} {o2} {b}" if up else f"{b} {o1} {v} {o2} {a}"
    return rng.choice([f"{v} {rng.choice(ops)} {_const(rng)}", f"{_const(rng)} {rng.choice(ops)} {v}"])


def family(rng: random.Random) -> list[str]:
    r = rng.random()
    if r < 0.4:
        e = expr(rng, 1)
        return [e, f"({e})", f"1\\cdot({e})", f"\\frac{{2({e})}}{{2}}", f"({e}) + 0", f"0 + ({e})", f"-(-({e}))", f"({e})^1",
                f"\\frac{{({e})(x+1)}}{{x+1}}", f"({e})\\cdot\\frac{{3}}{{3}}", f"({e}) + 1", f"({e}) - 1", f"2({e})", f"-({e})",
                f"({e})^2"]
    if r < 0.6:
        left, right = expr(rng, 2), expr(rng, 2)
        return [f"{left} = {right}", f"{right} = {left}", f"{left} - ({right}) = 0", f"-({left}) = -({right})",
                f"2({left}) = 2({right})", f"{left} = {right} + 1", f"{left} + 1 = {right}", f"y = {right}", right]
    if r < 0.8:
        a, b, c = rng.randint(-4, 4), rng.randint(-5, 5), rng.choice([2, 3, -1, -2])
        b2 = b + rng.choice([1, -1, 2])
        return [f"y = {a}x + {b}", f"y={b}+{a}x", f"{a}x - y + {b} = 0", f"y - {b} = {a}x", f"{c}y = {c * a}x + {c * b}",
                f"y = {a}x + {b2}", f"{a}x - y + {b2} = 0", f"y = {a + 1}x + {b}", f"x = {a}y + {b}", f"y = {a}x", "y = x",
                f"x + y + z = {b}", f"{c}x + {c}y + {c}z = {c * b}", f"x + y = {b}", f"z = {a}x + {b}y", rf"\sqrt{{2}}x + y = {b}",
                rf"\pi x - y = {b}", f"x - y = {b}", f"x - y = {b2}", rf"y = \frac{{x}}{{{c}}} + {b}", f"{c}y = x + {c * b}",
                f"x = {b}", f"x - {b} = 0", "x - 0 = 0", "x = 0", f"{b} = x", "xy = 0", f"xy = {b}", f"2x = {2 * b}"]
    a, b = sorted(rng.sample(range(-9, 10), 2))
    c = rng.choice([rf"\sqrt{{{rng.randint(2, 30)}}}", str(rng.randint(-9, 9)), r"\frac{\pi}{2}"])
    return [f"({a}, {b})", f"({a},{b})", f"[{a}, {b}]", f"({a}, {b}]", f"{a} < x < {b}", f"{b} > x > {a}", f"{a} \\le x < {b}",
            f"{a} < y < {b}", f"({a}, {b + 1})", f"x > {a}", f"{a} < x", f"({a}, \\infty)", f"x \\ge {c}", f"[{c}, \\infty)",
            f"(-\\infty, {c})", f"x < {c}", c, str(a), f"y = {a}x + {b}", f"{a}, {b}", f"x \\in ({a}, {b})",
            f"y \\in ({a}, {b})", f"x = ({a}, {b})", f"x \\in [{a}, {b}]", f"x = {a}", f"x + y = {b}", f"y = {a}x"]
