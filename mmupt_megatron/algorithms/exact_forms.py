"""The exact fast path of answer equivalence: common symbolic forms decided without math-verify.

``exact_form(text)`` passes the text through math-verify's own LaTeX normalization (so that it reads what
latex2sympy reads: ``\\frac12`` is ``\\frac{1}{2}``, a trailing "unit" like the ``t`` of ``x - t`` is
dropped), then reads a restricted grammar in pure Python (~0.1-0.2 ms an answer) into one of
- ``Scalar``: a rational function of one-letter (or Greek) variables and ``\\pi`` whose coefficients are
  rationals times square roots of integers: integer multiples of roots (``3\\sqrt{2}``, ``\\sqrt{18}``,
  ``\\frac{6}{\\sqrt{2}}``, ``2^{1/2}``), pi multiples (``\\frac{\\pi}{2}``), polynomials and rational
  expressions (``\\frac{x+1}{x-1}``, ``(x+1)^2``); a lone decimal (``0.5``) as an approximate scalar;
- ``Equation``: ``lhs = rhs`` of two scalars (lines, planes, polynomial equations);
- ``RealSet``: an interval with constant ends (``(1, 5)``, ``[-\\sqrt{2}, \\infty)``) or an inequality
  (chain) of one variable (``1 < x \\le 5``, ``x > 3``), read as the set it describes;
- ``Membership``: ``x \\in (1, 5)`` or ``x = (1, 5)``;
and ``None`` for anything else (decimals inside expressions, functions, ``\\text``, subscripts, nested
roots, and what latex2sympy reads its own way: ``2 3`` and ``2(3)`` are 5, ``2\\frac{1}{2}`` is 5/2,
``x(2)`` is a function call): those go to math-verify.

Exactness: every scalar is a polynomial over Q with generators ``\\pi``, the variables and ``\\sqrt{r}``
(``r`` square-free) divided by another; ``\\sqrt{r}`` for distinct square-free ``r`` are linearly independent
over Q and ``\\pi`` is transcendental, so two scalars are equal exactly when ``n1 * d2 - n2 * d1`` has no
non-zero coefficient.

``decide(a, b)`` returns what the math-verify path (``equivalence.AnswerMatcher`` without the fast path:
math-verify both ways, the equation rule and the numeric fingerprints) answers, or ``None`` where it cannot
be sure of that answer:
- equal exact forms are equal (math-verify proves them equal: ``simplify`` of a zero difference; equations
  equal up to sign; the same set);
- "different" only where the math-verify path says so for sure: an equation against a non-equation; numeric
  fingerprints that differ (computed here the way ``fingerprints.fingerprint`` computes them from sympy:
  same points, same symbol values, same tolerance); two linear equations that are not multiples of each
  other (math-verify solves both for the same unknowns); a membership against an equation;
- ``None`` where math-verify's own rules decide: a lone symbol or product of symbols (compared by name),
  equations that are multiples of each other (not up to sign), two inequalities describing the same set
  in other words, a decimal against a close exact value, a written variable that cancels (``0x``).
``same_set`` is the one deliberate difference: two inequalities of one variable describing the same set.
``tests/algorithms/test_exact_forms_on_cpu.py`` checks the reading against math-verify's parse and the
verdicts against the math-verify path on generated answers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

__all__ = ["Equation", "Membership", "RealSet", "Scalar", "decide", "exact_form", "same_set"]

# -- algebra ---------------------------------------------------------------------------------------------
# A monomial: (radicand, power of pi, ((variable, exponent), ...)); a polynomial: {monomial: Fraction}.
Mono = tuple[int, int, tuple[tuple[str, int], ...]]
Poly = dict[Mono, Fraction]

_ONE: Mono = (1, 0, ())
_MAX_TERMS = 64  # a product that grows past this is not a "common form": math-verify decides
_MAX_EXPONENT = 12
_MAX_RADICAND = 10**12
_MAX_INT_DIGITS = 15


class _Unsupported(Exception):
    """Outside the fast grammar: math-verify decides."""


def _const(value: Fraction | int) -> Poly:
    return {_ONE: Fraction(value)} if value else {}


def _mono_mul(a: Mono, b: Mono) -> tuple[int, Mono]:
    g = math.gcd(a[0], b[0])
    exps = dict(a[2])
    for name, e in b[2]:
        exps[name] = exps.get(name, 0) + e
    return g, ((a[0] // g) * (b[0] // g), a[1] + b[1], tuple(sorted(exps.items())))


def _add(a: Poly, b: Poly, sign: int = 1) -> Poly:
    out = dict(a)
    for mono, c in b.items():
        value = out.get(mono, 0) + sign * c
        if value:
            out[mono] = value
        else:
            out.pop(mono, None)
    return out


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            factor, mono = _mono_mul(ma, mb)
            value = out.get(mono, 0) + ca * cb * factor
            if value:
                out[mono] = value
            else:
                out.pop(mono, None)
    if len(out) > _MAX_TERMS:
        raise _Unsupported("too many terms")
    return out


def _is_constant_rational(p: Poly) -> bool:
    return all(mono == _ONE for mono in p)


def _variables(p: Poly) -> set[str]:
    return {name for mono in p for name, _ in mono[2]}


@lru_cache(maxsize=4096)
def _square_free(n: int) -> tuple[int, int]:
    """``n = s * s * r`` with ``r`` square-free: (s, r). ``n <= 10**12``."""
    s, r, p = 1, 1, 2
    while p * p <= n and p <= 10**4:
        count = 0
        while n % p == 0:
            n //= p
            count += 1
        s *= p ** (count // 2)
        r *= p ** (count % 2)
        p += 1 if p == 2 else 2
    if n > 1:  # what is left has no factor <= 10**4 and is <= 10**12: a prime, a product of two, or a square
        root = math.isqrt(n)
        if root * root == n:
            s *= root
        else:
            r *= n
    return s, r


@dataclass(frozen=True, slots=True)
class _RF:
    """num / den (den never the zero polynomial); ``symbols``: every variable written in the text."""

    num: Poly
    den: Poly
    symbols: frozenset[str]
    bare: bool = False
    """A single variable or a product of variables with coefficient 1 (math-verify compares those by name)."""

    def __add__(self, other: _RF) -> _RF:
        return _RF(_add(_mul(self.num, other.den), _mul(other.num, self.den)), _mul(self.den, other.den),
                   self.symbols | other.symbols)

    def __sub__(self, other: _RF) -> _RF:
        return _RF(_add(_mul(self.num, other.den), _mul(other.num, self.den), -1), _mul(self.den, other.den),
                   self.symbols | other.symbols)

    def __mul__(self, other: _RF) -> _RF:
        return _RF(_mul(self.num, other.num), _mul(self.den, other.den), self.symbols | other.symbols)

    def __truediv__(self, other: _RF) -> _RF:
        if not other.num:
            raise _Unsupported("division by zero")
        return _RF(_mul(self.num, other.den), _mul(self.den, other.num), self.symbols | other.symbols)

    def neg(self) -> _RF:
        return _RF({m: -c for m, c in self.num.items()}, self.den, self.symbols)

    def power(self, k: int) -> _RF:
        if abs(k) > _MAX_EXPONENT:
            raise _Unsupported("large exponent")
        if k < 0:
            if not self.num:
                raise _Unsupported("zero to a negative power")
            base = _RF(self.den, self.num, self.symbols)
            k = -k
        else:
            base = self
        num, den = _const(1), _const(1)
        for _ in range(k):
            num, den = _mul(num, base.num), _mul(den, base.den)
        return _RF(num, den, self.symbols)

    def rational(self) -> Fraction | None:
        """The value when this is a rational constant, else None."""
        if not _is_constant_rational(self.num) or not _is_constant_rational(self.den):
            return None
        return self.num.get(_ONE, Fraction(0)) / self.den[_ONE]

    def sqrt(self) -> _RF:
        value = self.rational()
        if value is None or value < 0:
            raise _Unsupported("root of a non-rational or a negative")
        radicand = value.numerator * value.denominator  # sqrt(p/q) = sqrt(p q) / q
        if radicand > _MAX_RADICAND:
            raise _Unsupported("large radicand")
        if radicand == 0:
            return _RF({}, _const(1), self.symbols)
        s, r = _square_free(radicand)
        return _RF({(r, 0, ()): Fraction(s, value.denominator)}, _const(1), self.symbols)

    def is_zero(self) -> bool:
        return not self.num

    def equals(self, other: _RF, sign: int = 1) -> bool:
        return not _add(_mul(self.num, other.den), _mul(other.num, self.den), -sign)


def _symbol_like(rf: _RF) -> bool:
    """Written as, or equal to, a product of distinct variables (sympy may reduce ``\\frac{2x}{2}`` to ``x``, and
    math-verify then compares names, not values): no verdict on those."""
    if rf.bare:
        return True
    if len(rf.num) != 1 or not _is_constant_rational(rf.den) or not rf.den:
        return False
    (mono, c), = rf.num.items()
    return mono[0] == 1 and mono[1] == 0 and bool(mono[2]) and all(e == 1 for _, e in mono[2]) and c == rf.den[_ONE]


def _rf_const(value: Fraction | int) -> _RF:
    return _RF(_const(value), _const(1), frozenset())


def _rf_var(name: str) -> _RF:
    return _RF({(1, 0, ((name, 1),)): Fraction(1)}, _const(1), frozenset([name]), bare=True)


_RF_PI = _RF({(1, 1, ()): Fraction(1)}, _const(1), frozenset())

# -- numbers the way the fingerprints compute them -----------------------------------------------------
_POINTS = (0.0, 0.3183098862, 0.7071067812)  # fingerprints._POINTS
_TOLERANCE = 1e-6  # fingerprints._TOLERANCE


def _symbol_value(name: str, shift: float) -> float:
    return 0.5772156649 + 0.1 * (sum(map(ord, name)) % 97) + shift  # fingerprints._value


def _eval_poly(p: Poly, values: dict[str, float]) -> float:
    total = magnitude = 0.0
    for (radicand, pi_power, exps), c in p.items():
        term = float(c) * (math.sqrt(radicand) if radicand != 1 else 1.0) * math.pi**pi_power
        for name, e in exps:
            term *= values[name] ** e
        total += term
        magnitude += abs(term)
    if abs(total) < 1e-7 * magnitude:
        raise _Unsupported("cancellation")  # floats would not tell this value to the fingerprints' 1e-6
    return total


def _eval(rf: _RF, shift: float) -> float:
    values = {name: _symbol_value(name, shift) for name in rf.symbols}
    den = _eval_poly(rf.den, values)
    if abs(den) < 1e-12:
        raise _Unsupported("pole")
    value = _eval_poly(rf.num, values) / den
    if not math.isfinite(value):
        raise _Unsupported("overflow")
    return value


def _close(a: float, b: float) -> bool:  # fingerprints._close
    return abs(a - b) <= _TOLERANCE * max(1.0, abs(a), abs(b)) or (math.isinf(a) and a == b)


# -- the answer kinds ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Scalar:
    value: _RF
    approximate: bool = False
    """A decimal literal: math-verify compares it to 6 places, so only "different" is decided here."""


@dataclass(frozen=True, slots=True)
class Equation:
    difference: _RF
    """lhs - rhs."""
    assignment: bool
    """A lone variable on the left that does not occur on the right (math-verify's "assignment")."""


@dataclass(frozen=True, slots=True)
class RealSet:
    low: _RF | None
    high: _RF | None
    """None: -oo / +oo."""
    low_open: bool
    high_open: bool
    relation: tuple | None = None
    """For an inequality: (variable, operators, bounds as written); None for an interval."""


@dataclass(frozen=True, slots=True)
class Membership:
    """``x \\in (1, 5)`` or ``x = (1, 5)``: a variable and an interval (sympy: ``Eq(x, Interval)``)."""

    variable: str
    interval: RealSet


ExactForm = Scalar | Equation | RealSet | Membership

# -- tokens --------------------------------------------------------------------------------------------
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "nu", "rho", "sigma", "tau", "phi", "psi",
          "omega", "kappa", "zeta", "eta", "xi", "chi"}
_RELATIONS = {"<": "<", ">": ">", "\\lt": "<", "\\gt": ">", "\\le": "<=", "\\leq": "<=", "\\leqslant": "<=",
              "\\ge": ">=", "\\geq": ">=", "\\geqslant": ">=", "=": "="}
_COMMANDS = {"\\frac", "\\sqrt", "\\pi", "\\cdot", "\\times", "\\infty", "\\in", *_RELATIONS} | {f"\\{g}" for g in _GREEK}
_TOKEN = re.compile(r"\s*(\\[A-Za-z]+|\\\{|\\\}|[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+|[A-Za-z]|[-+*/^=<>(){}\[\],]|\S)")
_EXCLUDED_LETTERS = set("eEiI")  # Euler's number, the imaginary unit, and their capitals (math-verify reads them so)


def _tokens(text: str) -> list[str]:
    out = []
    for match in _TOKEN.finditer(text):
        token = match.group(1)
        if token.startswith("\\") and len(token) > 2 and token not in _COMMANDS:
            raise _Unsupported(token)
        if len(token) == 1 and token.isalpha() and token in _EXCLUDED_LETTERS:
            raise _Unsupported(token)
        if token in ("\\{", "\\}") or not token.isascii() or (
                len(token) == 1 and not (token.isalnum() or token in "-+*/^=<>(){}[],")):
            raise _Unsupported(token)
        out.append(token)
    return out


class _Parser:
    """Recursive descent with latex2sympy's precedence: sums of terms; a term is a chain of implicit products
    joined by ``\\cdot``, ``\\times``, ``*`` and ``/`` from the left (``1/2x`` is ``1/(2x)``, ``1/2 \\cdot x`` is
    ``x/2``); an implicit product is a run of factors (``2\\sqrt{3}x``); a factor is a base with at most one
    ``^``."""

    def __init__(self, tokens: list[str]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self, offset: int = 0) -> str | None:
        j = self.i + offset
        return self.t[j] if j < len(self.t) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Unsupported(f"expected {expected}")
        self.i += 1
        return token

    def expr(self) -> _RF:
        sign = 1
        while self.peek() in ("+", "-"):
            sign = -sign if self.take() == "-" else sign
        value = self.term()
        value = value.neg() if sign < 0 else value
        while self.peek() in ("+", "-"):
            op = self.take()
            inner = 1
            while self.peek() in ("+", "-"):  # y - -3, 2x + -3
                inner = -inner if self.take() == "-" else inner
            right = self.term()
            value = value + right if (op == "+") == (inner > 0) else value - right
        return value

    def term(self) -> _RF:
        value = self.product()
        while self.peek() in ("\\cdot", "\\times", "*", "/"):
            op = self.take()
            right = self.product()
            value = value / right if op == "/" else _times(value, right)
        return value

    def product(self) -> _RF:
        number = self.peek() is not None and self.peek()[0].isdigit()
        value = self.factor(first=True)
        while self.peek() is not None and self._starts_factor(self.peek()):
            follows_number, number = number, self.peek()[0].isdigit()
            right = self.factor(first=False)
            if (value.rational() is not None or follows_number and number) and right.rational() is not None:
                raise _Unsupported("mixed number")  # 2\\frac{1}{2} is 5/2, x2 10 is 12x, \\frac62\\frac66 is 4 to latex2sympy
            value = _times(value, right)
        return value

    @staticmethod
    def _starts_factor(token: str) -> bool:
        return token.isalnum() or token in ("(", "{", "\\frac", "\\sqrt", "\\pi") or token[1:] in _GREEK

    def factor(self, *, first: bool) -> _RF:
        token = self.peek()
        if token is None:
            raise _Unsupported("end of input")
        if token[0].isdigit():
            base = self.number()  # after a number, product() refuses it: `2 3` is 5 to latex2sympy
        elif len(token) == 1 and token.isalpha():
            self.take()
            if self.peek() == "(":
                raise _Unsupported("function application")  # x(2) is a function call to latex2sympy
            base = _rf_var(token.lower())
        elif token[1:] in _GREEK:
            self.take()
            if self.peek() == "(":
                raise _Unsupported("function application")
            base = _rf_var(token[1:])
        elif token == "\\pi":
            self.take()
            if self.peek() == "(":
                raise _Unsupported("function application")
            base = _RF_PI
        elif token == "(":
            self.take()
            base = self.expr()
            self.take(")")
            if not first and base.rational() is not None:
                raise _Unsupported("juxtaposed number")  # 2(3), 2(+1), 2(\\frac{7}{7}) are sums to latex2sympy
        elif token == "\\frac":
            self.take()
            num, den = self.argument(digit_shorthand=True), self.argument(digit_shorthand=True)
            base = num / den
        elif token == "\\sqrt":
            self.take()
            if self.peek() == "[":
                raise _Unsupported("n-th root")
            base = self.argument(digit_shorthand=True).sqrt()
        else:
            raise _Unsupported(token)
        if self.peek() == "^":
            self.take()
            base = self.exponent(base)
            if self.peek() == "^":
                raise _Unsupported("power tower")
        return base

    def number(self) -> _RF:
        token = self.take()
        if "." in token:
            raise _Unsupported("decimal inside an expression")
        if len(token) > _MAX_INT_DIGITS or (len(token) > 1 and token[0] == "0"):
            raise _Unsupported("long or zero-padded integer")
        return _rf_const(int(token))

    def argument(self, *, digit_shorthand: bool) -> _RF:
        """``{expr}``, or a single digit / letter (``\\frac12``, ``\\sqrt3``)."""
        token = self.peek()
        if token == "{":
            self.take()
            value = self.expr()
            self.take("}")
            return value
        if digit_shorthand and token is not None and token.isdigit():
            if len(token) > 1:  # \frac12: TeX takes one digit; the rest is the next argument or a new factor
                self.t = [*self.t[: self.i], token[0], token[1:], *self.t[self.i + 1 :]]
            self.take()
            return _rf_const(int(token[0]))
        raise _Unsupported("argument")

    def exponent(self, base: _RF) -> _RF:
        token = self.peek()
        if token == "{":
            self.take()
            value = self.expr()
            self.take("}")
        elif token is not None and token.isdigit() and len(token) == 1:
            self.take()
            value = _rf_const(int(token))
        else:
            raise _Unsupported("exponent")
        k = value.rational()
        if k is None:
            raise _Unsupported("symbolic exponent")
        if k.denominator == 1:
            return base.power(k.numerator)
        if k == Fraction(1, 2):
            return base.sqrt()
        raise _Unsupported("fractional exponent")


def _times(a: _RF, b: _RF) -> _RF:
    product = a * b
    bare = (a.bare or a.rational() == 1) and b.bare
    return _RF(product.num, product.den, product.symbols, bare)


def _scalar(tokens: list[str]) -> _RF:
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.i != len(parser.t):
        raise _Unsupported("trailing tokens")
    return value


def _split_top(tokens: list[str], separators: set[str]) -> list[list[str] | str]:
    """Tokens split at top-level separators (kept as str items between the token lists)."""
    parts: list[list[str] | str] = [[]]
    depth = 0
    for token in tokens:
        if token in ("(", "{", "["):
            depth += 1
        elif token in (")", "}", "]"):
            depth -= 1
        if depth == 0 and token in separators:
            parts.extend([token, []])
        else:
            parts[-1].append(token)  # type: ignore[union-attr]
    return parts


def _end(tokens: list[str]) -> _RF | float:
    """An interval end: a constant scalar, or +-inf."""
    if tokens in (["\\infty"], ["+", "\\infty"]):
        return math.inf
    if tokens == ["-", "\\infty"]:
        return -math.inf
    value = _scalar(tokens)
    if value.symbols:
        raise _Unsupported("symbolic interval end")
    return value


def _less(a: _RF | float, b: _RF | float) -> bool:
    """a < b for constant ends; raises when too close to tell by floats."""
    x = a if isinstance(a, float) else _eval(a, 0.0)
    y = b if isinstance(b, float) else _eval(b, 0.0)
    if not isinstance(a, float) and not isinstance(b, float) and abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)):
        if a.equals(b):
            return False
        raise _Unsupported("ends too close to order")
    return x < y


def _interval(tokens: list[str]) -> RealSet:
    left, right = tokens[0], tokens[-1]
    parts = _split_top(tokens[1:-1], {","})
    if len(parts) != 3:
        raise _Unsupported("not two ends")
    low, high = _end(parts[0]), _end(parts[2])  # type: ignore[arg-type]
    if not _less(low, high):
        raise _Unsupported("not an interval")  # (2, 1) is a tuple, [1, 1] a set
    if (low == -math.inf and left == "[") or (high == math.inf and right == "]"):
        raise _Unsupported("closed at infinity")
    return RealSet(None if isinstance(low, float) else low, None if isinstance(high, float) else high,
                   left == "(", right == ")")


def _relation(parts: list) -> RealSet:
    """``a < x < b``, ``x \\ge a``, ``a < x`` ...: one variable between constant bounds."""
    sides, ops = parts[0::2], [_RELATIONS[p] for p in parts[1::2]]
    if len(ops) == 1:
        var_first = len(sides[0]) == 1 and _is_variable(sides[0][0])
        var_last = len(sides[1]) == 1 and _is_variable(sides[1][0])
        if var_first == var_last:
            raise _Unsupported("not one variable against a bound")
        variable, bound = (sides[0][0], sides[1]) if var_first else (sides[1][0], sides[0])
        op = ops[0] if var_first else {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[ops[0]]
        value = _end(bound)
        if isinstance(value, float):
            raise _Unsupported("infinite bound")
        low, high = (value, None) if op in (">", ">=") else (None, value)
        return RealSet(low, high, op != ">=", op != "<=", (_name(variable), tuple(ops), tuple(map(tuple, sides))))
    if len(ops) != 2 or not (len(sides[1]) == 1 and _is_variable(sides[1][0])):
        raise _Unsupported("not a chain around one variable")
    if all(op in ("<", "<=") for op in ops):
        low, high, low_open, high_open = _end(sides[0]), _end(sides[2]), ops[0] == "<", ops[1] == "<"
    elif all(op in (">", ">=") for op in ops):
        low, high, low_open, high_open = _end(sides[2]), _end(sides[0]), ops[1] == ">", ops[0] == ">"
    else:
        raise _Unsupported("mixed chain")
    if not _less(low, high):
        raise _Unsupported("empty chain")
    if (low == -math.inf and not low_open) or (high == math.inf and not high_open):
        raise _Unsupported("closed at infinity")
    return RealSet(None if isinstance(low, float) else low, None if isinstance(high, float) else high,
                   low_open, high_open, (_name(sides[1][0]), tuple(ops), tuple(map(tuple, sides))))


def _is_variable(token: str) -> bool:
    return (len(token) == 1 and token.isalpha()) or token[1:] in _GREEK


def _name(token: str) -> str:
    return token.lower() if len(token) == 1 else token[1:]


_DECIMAL = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+|\d+)$")


@lru_cache(maxsize=1)
def _normalizer():
    """math-verify's own LaTeX normalization (units, malformed operators, ``and``/``or``, percent words ...),
    imported lazily (latex2sympy2_extended imports sympy)."""
    from latex2sympy2_extended.math_normalization import normalize_latex
    from math_verify.parser import LatexExtractionConfig

    config = LatexExtractionConfig().normalization_config
    return lambda text: normalize_latex(text, config=config)


def exact_form(text: str) -> ExactForm | None:
    """The exact reading of one answer, or None (see module docstring).

    The text goes through math-verify's normalization first, so that the grammar reads what latex2sympy
    reads: ``x - t`` loses its "unit" ``t`` there, ``\\frac12`` becomes ``\\frac{1}{2}``.
    """
    try:
        text = _normalizer()(text)
        if "." in text and _DECIMAL.match(text):
            return Scalar(_rf_const(Fraction(text)), approximate=True)
        tokens = _tokens(text)
        if not tokens:
            return None
        if (len(tokens) > 2 and _is_variable(tokens[0]) and tokens[1] in ("\\in", "=") and tokens[2] in ("(", "[")
                and tokens[-1] in (")", "]") and "," in tokens):
            return Membership(_name(tokens[0]), _interval(tokens[2:]))
        if "\\in" in tokens:
            return None
        parts = _split_top(tokens, set(_RELATIONS))
        if len(parts) > 1:
            if any(not side for side in parts[0::2]):
                return None
            if parts[1::2] == ["="]:
                lhs, rhs = _scalar(parts[0]), _scalar(parts[2])  # type: ignore[arg-type]
                difference = lhs - rhs
                if not (_variables(difference.num) | _variables(difference.den)):
                    return None  # sympy evaluates an equation of constants (or of equal sides) to True / False
                written = [t for t in parts[0] if t not in ("+", "(", ")")]  # type: ignore[union-attr]
                assignment = len(written) == 1 and _is_variable(written[0]) and not (lhs.symbols & rhs.symbols)
                return Equation(difference, assignment)
            if "=" in parts[1::2]:
                return None  # chains with an equality
            return _relation(parts)
        if tokens[0] in ("(", "[") and tokens[-1] in (")", "]") and len(_split_top(tokens, {","})) == 1:
            inner = _split_top(tokens[1:-1], {","})
            if len(inner) == 3 and _balanced(tokens[1:-1]):
                return _interval(tokens)
        if "," in tokens:
            return None
        return Scalar(_scalar(tokens))
    except (_Unsupported, ZeroDivisionError, OverflowError, ValueError, KeyError, IndexError):
        return None


def _balanced(tokens: list[str]) -> bool:
    depth = 0
    for token in tokens:
        depth += token in ("(", "{", "[")
        depth -= token in (")", "}", "]")
        if depth < 0:
            return False
    return depth == 0


# -- verdicts -------------------------------------------------------------------------------------------
def _values(s: RealSet) -> tuple[float, float]:
    low = -math.inf if s.low is None else _eval(s.low, 0.0)
    high = math.inf if s.high is None else _eval(s.high, 0.0)
    return low, high


def _same_end(a: _RF | None, b: _RF | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.equals(b))


def _cancelled(rf: _RF) -> bool:
    """A written variable is gone from the exact form (``0x``, ``x - x``): sympy's free symbols may keep it."""
    return _variables(rf.num) | _variables(rf.den) != set(rf.symbols)


def _equation_fingerprint(e: Equation) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
    d = e.difference
    values = [_eval(d, shift) for shift in _POINTS]
    if abs(values[0]) < _TOLERANCE:
        return None
    return tuple(sorted(d.symbols)), tuple(v / values[0] for v in values[1:])


def _linear(rf: _RF) -> bool:
    """A polynomial of degree 1 in the variables (any constant coefficients, a constant denominator)."""
    return not _variables(rf.den) and all(sum(e for _, e in mono[2]) <= 1 for mono in rf.num)


def _by_monomial(p: Poly) -> dict[tuple, Poly]:
    """The coefficient (a polynomial in pi and roots) of each monomial in the variables."""
    out: dict[tuple, Poly] = {}
    for (radicand, pi_power, exps), c in p.items():
        out.setdefault(exps, {})[(radicand, pi_power, ())] = c
    return out


def _proportional(p: Poly, q: Poly) -> bool:
    """p = c q for a constant c (exact: cross products of the coefficients agree)."""
    cp, cq = _by_monomial(p), _by_monomial(q)
    if cp.keys() != cq.keys():
        return False
    first = next(iter(cp))
    return all(not _add(_mul(cp[first], cq[m]), _mul(cp[m], cq[first]), -1) for m in cp)


def _decide(a: ExactForm, b: ExactForm) -> bool | None:
    if isinstance(a, Membership) or isinstance(b, Membership):
        if isinstance(a, Membership) and isinstance(b, Membership) and a.variable == b.variable:
            return None  # the named-value rule compares the sets
        if isinstance(a, Equation | Membership) and isinstance(b, Equation | Membership):
            return False  # math-verify cannot subtract a set from a variable: never equal
        return None
    if isinstance(a, Equation) != isinstance(b, Equation):
        equation = a if isinstance(a, Equation) else b
        return None if equation.assignment else False  # an equation never equals a bare value
    if isinstance(a, Equation) and isinstance(b, Equation):
        if _cancelled(a.difference) or _cancelled(b.difference):
            return None  # sympy may keep `0x` and its x: the fingerprints' names would differ from ours
        if _symbol_like(a.difference) or _symbol_like(b.difference):
            return None  # x = 0 against x - 0 = 0: math-verify compares a lone symbol by name
        if a.difference.equals(b.difference) or a.difference.equals(b.difference, sign=-1):
            return True
        if _linear(a.difference) and _linear(b.difference):
            # math-verify solves both for the same unknowns: linear equations have the same solutions exactly
            # when one is a multiple of the other (that case, rare, is left to it)
            return None if _proportional(a.difference.num, b.difference.num) else False
        fa, fb = _equation_fingerprint(a), _equation_fingerprint(b)
        if fa is None or fb is None:
            return None
        if fa[0] != fb[0] or not all(_close(x, y) for x, y in zip(fa[1], fb[1], strict=True)):
            return False
        return None
    if isinstance(a, Scalar) and isinstance(b, Scalar):
        if _symbol_like(a.value) or _symbol_like(b.value):
            return None  # no fingerprint for a symbol or a product of symbols; math-verify compares their names
        if not a.approximate and not b.approximate and a.value.equals(b.value):
            return True
        return False if not _close(_eval(a.value, 0.0), _eval(b.value, 0.0)) else None
    if isinstance(a, RealSet) and isinstance(b, RealSet):
        same_ends = _same_end(a.low, b.low) and _same_end(a.high, b.high)
        if same_ends and a.low_open == b.low_open and a.high_open == b.high_open:
            if a.relation is not None and b.relation is not None:
                return True if a.relation == b.relation else None  # same set, other words: math-verify decides
            return True
        if not all(_close(x, y) for x, y in zip(sorted(_values(a)), sorted(_values(b)), strict=True)):
            return False
        if same_ends and (a.relation is None or b.relation is None):
            return False  # math-verify compares the ends and their openness
        return None
    scalar = a if isinstance(a, Scalar) else b
    if _symbol_like(scalar.value):  # type: ignore[union-attr]
        return None
    return False  # one value against two ends: the fingerprints differ in length


def same_set(a: ExactForm | None, b: ExactForm | None) -> bool:
    """Two inequalities of the same variable that describe the same set in other words (``5 > x > 3`` and
    ``3 < x < 5``, ``x > 3`` and ``3 < x``): equal to a reader; math-verify compares them relation by
    relation and says not equal (``answer_forms.DELIBERATE_DIFFERENCES``)."""
    if not (isinstance(a, RealSet) and isinstance(b, RealSet) and a.relation and b.relation):
        return False
    return (a.relation[0] == b.relation[0] and a.low_open == b.low_open and a.high_open == b.high_open
            and _same_end(a.low, b.low) and _same_end(a.high, b.high))


def decide(a: ExactForm | None, b: ExactForm | None) -> bool | None:
    """The math-verify path's verdict on two exact forms, or None when it needs math-verify."""
    if a is None or b is None:
        return None
    try:
        return _decide(a, b)
    except (_Unsupported, ZeroDivisionError, OverflowError, ValueError):
        return None
