"""Canonical forms of extracted answers: the exact, microsecond stage of answer equivalence.

``canonical_form`` strips presentation and classifies an answer as
- ``choice``: the *whole* answer is a letter option: ``B``, ``(B)``, ``[B]``, ``\\text{B}``, ``B.``, ``B)``.
  A capital that starts an expression (``D = (0, 1)``, ``C + 1``, ``A \\cup B``) is never a choice;
- ``number``: an exact rational written as a plain number, with an optional ``v =`` (one letter) in front:
  integers and decimals (``.5``, ``-0.50``, ``+5``), thousands separators only in valid groups of three
  (``1,234,567``, ``1{,}234``, ``1 234``, ``1\\,234``; ``0,111`` and ``32, 349`` are *not* numbers),
  fractions (``3/4``, ``\\frac{3}{4}``, ``\\frac34``, ``\\frac{-1}{2}``), mixed numbers (``4 4/9``,
  ``4\\frac{4}{9}`` = 40/9: a whole part >= 1 and a proper fraction), a degree sign, and a percent sign or
  word after a decimal (``28\\%``, ``28 percent``, ``28 pct`` all read as 28, as math-verify reads ``28\\%``).
  Scientific notation, decimal commas, numbers over 15 significant digits and anything else stay ``expr``;
- ``expr``: everything else, keyed by its text with presentation removed (``$``, ``\\left``/``\\right``,
  ``\\dfrac``, spacing commands; runs of whitespace become one space, but a space is never deleted: it can
  separate two numbers, and math-verify reads ``- 15.`` and ``-15.`` differently).
A ``\\text{}`` around the whole answer is looked through for letters only (math-verify reads
``\\mathrm{3.5}`` as text, so a wrapped number is an ``expr`` and goes to math-verify).

Rules for comparing forms (``AnswerMatcher`` applies them): equal forms are equal answers; two numbers are
equal when their values are, unless both name a variable and the variables differ (``x = 3`` equals
``3`` but not ``y = 3``); two letters are equal only when they are the same letter; a letter never equals
anything else. Only pairs with an ``expr`` need math-verify.

Deliberate differences from math-verify 0.9.0 (which reads these spellings otherwise, see
``DELIBERATE_DIFFERENCES``) are listed with their reasons below; the differential tests check that there
are no others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Literal

AnswerKind = Literal["number", "choice", "expr"]

DELIBERATE_DIFFERENCES: dict[str, str] = {
    "letter option with a period or parenthesis (`B.`, `B)`)": (
        "math-verify keeps them as unparsed strings, unequal to `B`; they are how models mark an option"
    ),
    "thousands grouped by spaces (`1 234`, `1\\,234`)": (
        "math-verify reads `1 234` as 235; a space between groups of three digits is a thousands separator"
    ),
    "mixed number with a space (`4 4/9`)": (
        "math-verify reads it as 8/9 (while `4\\frac{4}{9}` is 40/9 there); it is 4 + 4/9"
    ),
    "percent word or unescaped `%` (`12.5 percent`, `12.5 pct`, `12.5%`, `-5%`)": (
        "math-verify equates `12.5\\%` with 12.5 but not `12.5 percent` or `12.5%` (and `-5%` with neither -5"
        " nor -0.05); the word, the sign and the escaped sign mean the same"
    ),
}


@dataclass(frozen=True, slots=True)
class CanonicalAnswer:
    kind: AnswerKind
    key: str
    """number: the exact value (``str(Fraction)``); choice: the letter; expr: the normalised text."""
    var: str = ""
    """number only: the variable of ``x = 3``, else empty."""
    text: str = field(default="", compare=False)
    """What math-verify reads for this answer: a number's exact value, an expression's own text."""


_OUTER_MATH = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}$")
_ANY_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LAYOUT = re.compile(r"\\(?:displaystyle|textstyle|left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![A-Za-z])")
_SPACING = re.compile(r"\\[,;:! ]|~|\\q?quad(?![A-Za-z])")
_SPACES = re.compile(r"\s+")
_CHOICE = re.compile(r"^(?:\(([A-J])\)|\[([A-J])\]|([A-J]) ?[.)]?)$")
_WRAPPED_CHOICE = re.compile(r"^(?:\(([A-J])\)|([A-J]))$")  # inside a whole-answer \text{}

_INT = r"\d+"
_GROUPED = r"[1-9]\d{0,2}(?:,\d{3})+|[1-9]\d{0,2}(?:\{,\}\d{3})+|[1-9]\d{0,2}(?: \d{3})+"
_DECIMAL = re.compile(rf"^(?P<int>{_GROUPED}|{_INT})?(?:\.(?P<frac>\d+))?$")
_FRACTION = re.compile(
    r"^(?:(?P<n1>[+-]?\d+)/(?P<d1>[+-]?\d+)|\\frac\{\s*(?P<n2>[+-]?\d+)\s*\}\{\s*(?P<d2>[+-]?\d+)\s*\}|\\frac(?P<n3>\d)(?P<d3>\d))$"
)
_MIXED = re.compile(r"^(?P<whole>[1-9]\d*)(?: (?P<slash>\d+/\d+)| ?(?P<frac>\\frac.*))$")
_SIGN = re.compile(r"^(?P<sign>[+-]?) ?")
_DEGREES = re.compile(r"(?:\^ ?\{ ?\\circ ?\}|\^ ?\\circ|°|\\degree)$")
_PERCENT = re.compile(r"(?: ?\\?%| ?(?:percent|percentage|pct))$")
_ASSIGNMENT = re.compile(r"^(?P<var>[A-DF-Za-df-z]) ?= ?(?P<value>[^=]+)$")
_MAX_DIGITS = 15  # math-verify compares floats at 15 significant digits; longer numbers go to it as text


def _strip_presentation(answer: str) -> str:
    text = _LAYOUT.sub("", strip_math_delimiters(answer))
    text = _SPACING.sub(" ", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACES.sub(" ", text).strip()


def strip_math_delimiters(answer: str) -> str:
    """``$..$``, ``$$..$$``, ``\\(..\\)`` and ``\\[..\\]`` around the whole answer, removed."""
    text = answer.strip()
    changed = True
    while changed:
        changed = False
        for opener, closer in _OUTER_MATH:
            if text.startswith(opener) and text.endswith(closer) and len(text) > len(opener) + len(closer):
                text, changed = text[len(opener) : len(text) - len(closer)].strip(), True
                break
    return text


def _unwrap(text: str) -> str:
    """``\\text{...}`` and friends around the whole answer."""
    match = _WRAPPER.match(text)
    while match:
        text = match.group(1).strip()
        match = _WRAPPER.match(text)
    return text


def _decimal_value(text: str) -> Fraction | None:
    match = _DECIMAL.match(text)
    if not match or (match.group("int") is None and match.group("frac") is None):
        return None
    whole = re.sub(r"\D", "", match.group("int") or "0")
    frac = match.group("frac") or ""
    if len((whole + frac).lstrip("0")) > _MAX_DIGITS:
        return None
    return Fraction(f"{whole}.{frac}" if frac else whole)


def _fraction_value(text: str) -> Fraction | None:
    match = _FRACTION.match(text)
    if not match:
        return None
    pairs = (("n1", "d1"), ("n2", "d2"), ("n3", "d3"))
    num, den = next((match.group(n), match.group(d)) for n, d in pairs if match.group(n) is not None)
    if int(den) == 0 or max(len(num.lstrip("+-")), len(den.lstrip("+-"))) > _MAX_DIGITS:
        return None
    return Fraction(int(num), int(den))


def _unsigned_value(text: str) -> Fraction | None:
    """A number without its sign (a sign inside a fraction is allowed), or None."""
    value = _decimal_value(text)
    if value is not None:
        return value
    value = _fraction_value(text)
    if value is not None:
        return value
    match = _MIXED.match(text)
    if match:
        part = _fraction_value(match.group("slash") or match.group("frac"))
        text_part = match.group("slash") or match.group("frac")
        if part is not None and 0 < part < 1 and "-" not in text_part and "+" not in text_part:
            return int(match.group("whole")) + part
    return None


def number_value(text: str) -> Fraction | None:
    """The exact value of a plain number (see module docstring), or None. ``text`` is already stripped."""
    if _DEGREES.search(text):
        text = _DEGREES.sub("", text).rstrip()
    elif _PERCENT.search(text):
        text = _PERCENT.sub("", text).rstrip()
        if _decimal_value(_SIGN.sub("", text, count=1)) is None:
            return None  # `\frac{1}{2}\%` and the like: math-verify does not read them as numbers
    sign = _SIGN.match(text)
    value = _unsigned_value(text[sign.end() :])
    if value is None:
        return None
    return -value if sign.group("sign") == "-" else value


def _render(value: Fraction, spelling: str) -> str:
    """What math-verify reads for a number: a decimal if it was written with a point, else a fraction.

    (math-verify compares a decimal to 6 places, a fraction exactly: ``6.283185`` equals ``2\\pi``.)
    """
    places = re.search(r"\.(\d+)", spelling)
    if places:  # as many places as written: an integer written as 3.00 is a decimal to math-verify too
        with localcontext() as context:
            context.prec = 2 * _MAX_DIGITS  # exact: a written decimal has at most _MAX_DIGITS digits
            exact = Decimal(value.numerator) / Decimal(value.denominator)
            return format(exact.quantize(Decimal(1).scaleb(-len(places.group(1)))), "f")
    if value.denominator == 1:
        return str(value.numerator)
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def canonical_form(answer: str) -> CanonicalAnswer:
    """Classify and normalise one extracted answer (see module docstring)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = _strip_presentation(answer)
    plain = _unwrap(text)
    pattern = _WRAPPED_CHOICE if plain != text else _CHOICE
    choice = pattern.match(_ANY_WRAPPER.sub(lambda m: m.group(1).strip(), plain))
    if choice:
        return CanonicalAnswer("choice", next(g for g in choice.groups() if g))
    value = number_value(text)  # not `plain`: math-verify reads `\mathrm{3.5}` as text, not as 3.5
    if value is not None:
        return CanonicalAnswer("number", str(value), text=_render(value, text))
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        value = number_value(assignment.group("value").strip())
        if value is not None:
            var = assignment.group("var")
            return CanonicalAnswer("number", str(value), var=var, text=f"{var} = {_render(value, text)}")
    return CanonicalAnswer("expr", text, text=strip_math_delimiters(answer))


def numbers_equal(a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
    """Two ``number`` forms: same value, and the same variable when both name one."""
    return a.key == b.key and (a.var == b.var or not a.var or not b.var)
