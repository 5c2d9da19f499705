"""Hypothesis strategies: pairs of answers that state the same value, or a near miss, in many spellings.

``answer_pairs()`` draws a family (integers, fractions, decimals, percents, roots, intervals, equations,
sets, letters, expressions, named values, decimals of 6+ places), a value, then either the same value or a near miss of it (off by one, digits
regrouped, another variable, another bracket...), and writes each in a random surface form with random
LaTeX wrappers.
"""

from __future__ import annotations

from fractions import Fraction

from hypothesis import strategies as st

_WRAPS = ("{}", "{}", "{}", "${}$", "\\({}\\)", "\\left({}\\right)", "\\text{{{}}}", "\\mathrm{{{}}}", "{}.", " {} ",
          "\\displaystyle {}", "\\boxed{{{}}}")


def _grouped(n: int, sep: str) -> str:
    return f"{n:,}".replace(",", sep)


def _int_forms(n: int) -> list[str]:
    forms = [str(n), f"{n}.0", f"{n}.00", f"+{n}" if n >= 0 else f"- {-n}", f"{n}^\\circ", f"{n}^{{\\circ}}",
             f"{n}°", f"{n}\\%", f"{n}%", f"{n} percent", f"{n} pct", f"\\frac{{{2 * n}}}{{2}}", f"{n}/1",
             f"x = {n}", f"y={n}", f"\\sqrt{{{n * n}}}" if n >= 0 else f"-\\sqrt{{{n * n}}}", f"0{n}" if n > 0 else str(n),
             f"{n}e0", f"{n}\\text{{ cm}}"]
    if abs(n) >= 1000:
        forms += [_grouped(n, ","), _grouped(n, "{,}"), _grouped(n, " "), _grouped(n, "\\,"), _grouped(n, ", ")]
    return forms


def _fraction_forms(value: Fraction) -> list[str]:
    p, q = value.numerator, value.denominator
    sign, ap = ("-" if p < 0 else ""), abs(p)
    forms = [f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}", f"{sign}\\frac{{{ap}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}",
             f"{sign}\\tfrac{{{ap}}}{{{q}}}", f"\\frac{{{2 * p}}}{{{2 * q}}}", f"\\frac{{{p}}}{{-{q}}}".replace("--", ""),
             f"{p} / {q}", f"x = \\frac{{{p}}}{{{q}}}"]
    if ap < 10 and q < 10:
        forms.append(f"{sign}\\frac{ap}{q}")
    if ap > q:
        whole, rest = divmod(ap, q)
        if rest:
            forms += [f"{sign}{whole} {rest}/{q}", f"{sign}{whole}\\frac{{{rest}}}{{{q}}}", f"{sign}{whole} \\frac{{{rest}}}{{{q}}}"]
    if 10**6 % q == 0:
        decimal = f"{float(abs(value)):.6f}".rstrip("0").rstrip(".")
        forms += [f"{sign}{decimal}", f"{sign}{decimal}0", f"{sign}{decimal.lstrip('0')}" if decimal.startswith("0.") else decimal]
        if decimal.startswith("0."):
            forms.append(f"{sign}0,{decimal[2:]}")
        forms += [f"{sign}{decimal}\\%", f"{sign}{decimal} percent", f"{sign}{decimal}%"]
    return forms


def _root_forms(k: int, c: int) -> list[str]:  # c * sqrt(k)
    forms = [f"{c}\\sqrt{{{k}}}", f"{c} \\sqrt {k}", f"\\sqrt{{{c * c * k}}}", f"{c}\\cdot\\sqrt{{{k}}}",
             f"{c}{k}^{{1/2}}", f"\\frac{{{2 * c}\\sqrt{{{k}}}}}{{2}}", f"{c}*\\sqrt{{{k}}}"]
    if c == 1:
        forms += [f"\\sqrt{{{k}}}", f"\\sqrt{k}", f"{k}^{{1/2}}", f"\\frac{{{k}}}{{\\sqrt{{{k}}}}}"]
    return forms


def _interval_forms(a: int, b: int, left: str, right: str) -> list[str]:
    lo = {"(": "<", "[": "\\le"}[left]
    hi = {")": "<", "]": "\\le"}[right]
    forms = [f"{left}{a},{b}{right}", f"{left}{a}, {b}{right}", f"\\left{left}{a},{b}\\right{right}",
             f"x \\in {left}{a},{b}{right}", f"{a} {lo} x {hi} {b}", f"{a}{lo}f(x){hi}{b}"]
    if left == "(" and right == ")":
        forms += [f"{a}, {b}", f"\\{{{a},{b}\\}}"]
    return forms


def _equation_forms(lhs: str, value: int) -> list[str]:
    return [f"{lhs} = {value}", f"{lhs}={value}", f"{value} = {lhs}", f"{lhs} - {value} = 0", str(value)]


def _set_forms(items: tuple[int, ...]) -> list[str]:
    inner = ", ".join(map(str, items))
    rev = ", ".join(map(str, reversed(items)))
    return [f"\\{{{inner}\\}}", f"\\{{{rev}\\}}", inner, rev, f"({inner})", f"\\boxed{{{items[0]}}}, \\boxed{{{items[-1]}}}",
            f"x = {items[0]}, x = {items[-1]}", f"x = {items[0]} \\text{{ or }} x = {items[-1]}"]


def _letter_forms(letter: str) -> list[str]:
    return [letter, f"({letter})", f"\\text{{{letter}}}", f"{letter}.", f"{letter})", f"[{letter}]",
            f"\\textbf{{{letter}}}", f"\\text{{({letter})}}", f"(\\text{{{letter}}})", f"\\text{{[{letter}]}}", letter.lower(), f"{letter} + 1", f"{letter} = 1",
            f"{letter} \\cup B", f"{letter} = (0, 1)", f"option {letter}", f"({letter}) 45"]


def _expression_forms(name: str) -> list[str]:
    table = {
        "x+1": ["x+1", "1+x", "x + 1", "(x+1)", "x+1.0", "y = x + 1"],
        "2x": ["2x", "x+x", "2 x", "2\\cdot x", "x \\cdot 2"],
        "x^2": ["x^2", "x^{2}", "x\\cdot x", "xx", "x^2+0"],
        "2pi": ["2\\pi", "\\pi \\cdot 2", "2 \\pi", "\\frac{4\\pi}{2}", "6.283185"],
        "pi/2": ["\\frac{\\pi}{2}", "\\pi/2", "90^\\circ", "1.570796", "\\frac12\\pi"],
        "mc2": ["E = mc^2", "E=mc^{2}", "mc^2", "E = m c^2"],
    }
    return table[name]


_NAMES = ("k", "AB", "f(2)", "x_1", "\\theta", "n")


def _named_forms(name: str, value: int) -> list[str]:
    if name == "(p,q)":
        a, b = divmod(value, 10)
        return [f"(p,q) = ({a},{b})", f"(p, q) = ({a}, {b})", f"({a},{b})", f"({a}, {b})", f"{a}, {b}"]
    return [f"{name} = {value}", f"{name}={value}", str(value), f"{name} = {value}.0", f"{value}^\\circ" if value > 0 else str(value)]


def _decimal6_forms(value: Fraction) -> list[str]:
    p, q = value.numerator, value.denominator
    sign = "-" if value < 0 else ""
    forms = [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"{sign}\\frac{{{abs(p)}}}{{{q}}}"]
    for places in (6, 7, 8):
        forms.append(f"{round(float(value), places):.{places}f}")
    return forms


def _decimal6_near(value: Fraction, draw: st.DrawFn) -> list[str]:
    truncated = f"{int(value * 10**6) / 10**6:.6f}"
    return [truncated, f"{round(float(value), 5):.5f}", f"{round(float(value) + 2e-6, 6):.6f}", f"{round(float(value), 3):.3f}"]


_NEAR_INT = st.sampled_from([1, -1, 10, -10, 100, 2, 1000])
_EXPRESSIONS = ("x+1", "2x", "x^2", "2pi", "pi/2", "mc2")


@st.composite
def _value(draw: st.DrawFn) -> tuple[str, tuple]:
    family = draw(st.sampled_from(["int", "frac", "root", "interval", "equation", "set", "letter", "expr", "named",
                                   "decimal6"]))
    if family == "named":
        name = draw(st.sampled_from((*_NAMES, "(p,q)")))
        return family, (name, draw(st.integers(10, 99)) if name == "(p,q)" else draw(st.integers(-20, 120)))
    if family == "decimal6":
        q = draw(st.sampled_from([3, 6, 7, 9, 11, 12, 13]))
        return family, (Fraction(draw(st.integers(-40, 40).filter(lambda p: p % q != 0)), q),)
    if family == "int":
        return family, (draw(st.one_of(st.integers(-30, 30), st.integers(1000, 99999), st.integers(-2000, -1000))),)
    if family == "frac":
        q = draw(st.sampled_from([2, 3, 4, 5, 8, 9, 10, 25, 125, 7]))
        p = draw(st.integers(-40, 40).filter(lambda p: p % q != 0))
        return family, (Fraction(p, q),)
    if family == "root":
        return family, (draw(st.sampled_from([2, 3, 5, 6, 7])), draw(st.integers(1, 4)))
    if family == "interval":
        a = draw(st.integers(-5, 5))
        return family, (a, a + draw(st.integers(1, 5)), draw(st.sampled_from("([")), draw(st.sampled_from(")]")))
    if family == "equation":
        return family, (draw(st.sampled_from(["x", "y", "x + y", "a + 3z", "11a+c", "2x"])), draw(st.integers(-3, 12)))
    if family == "set":
        items = draw(st.lists(st.integers(-5, 40), min_size=2, max_size=3, unique=True))
        return family, tuple(sorted(items))
    if family == "letter":
        return family, (draw(st.sampled_from("ABCDEJ")),)
    return family, (draw(st.sampled_from(_EXPRESSIONS)),)


def _near_miss(draw: st.DrawFn, family: str, args: tuple) -> tuple:
    if family == "int":
        return (args[0] + draw(_NEAR_INT),) if draw(st.booleans()) else (int(str(abs(args[0]))[::-1]) or 7,)
    if family == "frac":
        value = args[0]
        return (draw(st.sampled_from([value + 1, value * 10, -value, 1 / value if value else Fraction(3),
                                      Fraction(value.numerator, value.denominator + 1)])),)
    if family == "root":
        return (args[0] + 1, args[1]) if draw(st.booleans()) else (args[0], args[1] + 1)
    if family == "interval":
        a, b, left, right = args
        return draw(st.sampled_from([(a, b, "[" if left == "(" else "(", right), (a, b + 1, left, right), (a - 1, b, left, right)]))
    if family == "equation":
        return (args[0], args[1] + 1) if draw(st.booleans()) else (draw(st.sampled_from(["x", "y", "z", "x + y"])), args[1])
    if family == "set":
        return draw(st.sampled_from([args[:-1] + (args[-1] + 1,), args[:1], args + (99,)]))
    if family == "letter":
        return (draw(st.sampled_from("ABCDEJ")),)
    if family == "named":
        name, value = args
        if name == "(p,q)":
            return name, draw(st.sampled_from([value + 1, (value % 10) * 10 + value // 10]))
        return (draw(st.sampled_from([n for n in _NAMES if n != name])), value) if draw(st.booleans()) else (name, value + 1)
    if family == "decimal6":
        return ("near", args[0])
    return (draw(st.sampled_from(_EXPRESSIONS)),)


def _forms(family: str, args: tuple) -> list[str]:
    return {
        "int": lambda: _int_forms(*args),
        "frac": lambda: _fraction_forms(*args),
        "root": lambda: _root_forms(*args),
        "interval": lambda: _interval_forms(*args),
        "equation": lambda: _equation_forms(*args),
        "set": lambda: _set_forms(args),
        "letter": lambda: _letter_forms(*args),
        "expr": lambda: _expression_forms(*args),
        "named": lambda: _named_forms(*args),
        "decimal6": lambda: _decimal6_forms(args[0]) if args[0] != "near" else _decimal6_near(args[1], None),
    }[family]()


@st.composite
def answer_pairs(draw: st.DrawFn) -> tuple[str, str]:
    family, args = draw(_value())
    other = args if draw(st.booleans()) else _near_miss(draw, family, args)
    a = draw(st.sampled_from(_forms(family, args)))
    b = draw(st.sampled_from(_forms(family, other)))
    wrap_a, wrap_b = draw(st.sampled_from(_WRAPS)), draw(st.sampled_from(_WRAPS))
    return wrap_a.format(a), wrap_b.format(b)
