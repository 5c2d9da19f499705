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

Named values: ``NAME = VALUE`` (and ``x \\in S``) where NAME is a single name: a symbol (``k``, ``x_1``,
``\\theta``; not ``e``, Euler's number), a tuple of symbols (``(p, q)``), a segment (``AB``,
``\\overline{AB}``), an angle (``\\angle ABC``) or a function value (``f(x)``, ``g(2)``), and a symbol does not
occur in VALUE (``x = 2x - 3`` is an equation). The form keeps the name (``var``) and the value's own form
(``value``): a number with a name is a ``number`` (``AB = 1``), anything else an ``expr``.

Lists (``list_structure``): several items separated by top-level commas: a bare ``list`` (``1, 2``; what
several boxes in one response become, see ``answers``), a ``set`` (``\\{1, 2\\}``) or a ``tuple``
(``(1, 2, 3)``). ``1,5`` alone (a decimal comma to math-verify) is not a list.

Rules for comparing forms (``AnswerMatcher`` applies them): equal forms are equal answers; two numbers are
equal when their values are, or when one is written as a decimal with at least 6 places (trailing zeros not
counted) and is the other one rounded to those places (``0.333333`` and ``0.3333333`` equal ``\\frac{1}{3}``;
``0.333`` and ``0.666666`` do not), unless both name a variable and the names differ (``x = 3`` equals
``3`` but not ``y = 3``); two letters are equal only when they are the same letter; a letter never equals
anything else. A named value equals its value (``k = 45`` and ``45``; ``(p, q) = (3, 2)`` and ``(3, 2)``;
``f(x) = x^2`` and ``x^2``), two named values with the same name compare their values, and with different
names, or against an equation, the whole answers compare. Lists compare item by item: as multisets when
one is a set or a list of solutions of one variable (``x = 1, x = 2``), in order otherwise (a tuple, or two
bare lists: ``10, 4, -2`` is not ``4, 10, -2``). Only pairs with an ``expr`` need math-verify.

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
    "one inequality in other words (`5 > x > 3` and `3 < x < 5`, `5 \\ge x > 3` and `3 < x \\le 5`)": (
        "math-verify compares two chains relation by relation (`5 > x` against `3 < x`) and calls them unequal;"
        " for the same variable they describe the same set (``exact_forms.same_set``)"
    ),
    "a segment's name with or without its bar (`\\overline{AB} = 3`, `AB = 3`)": (
        "math-verify reads `AB` as the product a*b and `\\overline{AB}` as a symbol; both name the segment AB"
    ),
}
"""Spellings we call equal and math-verify does not. (Where we are stricter: two bare lists, or a list and a
tuple, in another order, ``2, 1`` and ``(1, 2)``, are not equal: math-verify sorts the items first.)"""


@dataclass(frozen=True, slots=True)
class CanonicalAnswer:
    kind: AnswerKind
    key: str
    """number: the exact value (``str(Fraction)``); choice: the letter; expr: the normalised text."""
    var: str = ""
    """The name of a named value (``x = 3``, ``AB = 1``, ``(p,q) = (3,2)``), else empty."""
    text: str = field(default="", compare=False)
    """What math-verify reads for this answer: a number's exact value, an expression's own text."""
    decimal: bool = field(default=False, compare=False)
    """number only: written with a decimal point (the rounding rule, see module docstring)."""
    value: CanonicalAnswer | None = field(default=None, compare=False)
    """A named value's value (without the name); None when unnamed."""
    equation: bool = field(default=False, compare=False)
    """expr only: an equation that is not a named value (``x + y = 1``, ``(k = 0)``; ``y = 2x + 3`` is named)."""


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
_GREEK = ("alpha|beta|gamma|delta|Delta|theta|Theta|lambda|mu|nu|rho|sigma|tau|phi|varphi|Phi|psi|omega|Omega|"
          "kappa|zeta|eta|xi|chi")
_SYMBOL = rf"(?:[A-Za-df-z]|\\(?:{_GREEK}))(?:_(?:\{{[A-Za-z0-9]+\}}|[A-Za-z0-9]))?"
_NAME = (rf"(?P<tuple>\(\s?{_SYMBOL}(?:\s?,\s?{_SYMBOL})+\s?\))"
         r"|(?P<angle>(?:m\s?)?\\angle\s?[A-Z]{1,3})"
         r"|(?P<segment>\\overline\s?\{\s?[A-Z]{2}\s?\}|[A-Z]{2})"
         r"|(?P<function>[A-Za-z](?:\^\{-1\})?\s?\([^()=<>]*\))"
         rf"|(?P<symbol>{_SYMBOL})")
_NAMED = re.compile(rf"^(?:{_NAME}) ?(?P<op>=|\\in(?![A-Za-z])) ?(?P<value>[^=]+)$")
_IDENTIFIER_NOISE = re.compile(r"\\(?:text|mathrm|operatorname|mbox)\s?\{[^{}]*\}|\\[A-Za-z]+")
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


_BOX = re.compile(r"^\\(?:boxed|fbox)\s?\{(.*)\}$", re.DOTALL)


def presentation_stripped(answer: str) -> str:
    """The answer's text as its ``expr`` key has it: delimiters, layout commands and spacing removed."""
    return _strip_presentation(answer)


def _unbox(text: str) -> str:
    """``\\boxed{...}`` around a whole list item (``\\boxed{1}, \\boxed{2}``), removed."""
    match = _BOX.match(text)
    while match and _balanced(match.group(1)):
        text = match.group(1).strip()
        match = _BOX.match(text)
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if depth < 0:
            return False
    return depth == 0


def _name_of(match: re.Match) -> tuple[str, list[str]]:
    """The normalised name of a ``NAME = ...`` match and the identifiers that must not occur in its value."""
    if match.group("tuple"):
        symbols = [part.strip() for part in match.group("tuple").strip()[1:-1].split(",")]
        return "(" + ",".join(symbols) + ")", symbols
    if match.group("angle"):
        return "\\angle " + match.group("angle").split("angle")[1].strip(), []
    if match.group("segment"):
        segment = re.sub(r"[^A-Z]", "", match.group("segment").replace("overline", ""))
        return segment, [segment]
    if match.group("function"):
        function = match.group("function").replace(" ", "")
        return function, [function[0] + "("]
    symbol = match.group("symbol")
    return symbol, [symbol]


def _occurs(identifier: str, value: str) -> bool:
    """Whether a name's identifier occurs in a value (letters case-insensitively: latex2sympy lowercases)."""
    if identifier.endswith("("):
        return identifier in value.replace(" ", "")
    if identifier.startswith("\\"):
        return re.search(re.escape(identifier.split("_")[0]) + r"(?![A-Za-z])", value) is not None
    letters = _IDENTIFIER_NOISE.sub(" ", value)
    if len(identifier) == 2 and identifier.isupper():  # a segment
        return identifier in letters
    return identifier[0].lower() in letters.lower()


def _named(text: str, answer: str) -> CanonicalAnswer | None:
    """``NAME = VALUE`` / ``x \\in S`` as a named form (see module docstring), or None."""
    match = None if text.endswith(".") else _NAMED.match(text)  # math-verify reads `E = mc^2.` its own way
    if not match:
        return None
    name, identifiers = _name_of(match)
    value_text = match.group("value").strip()
    if match.group("op") != "=" and not match.group("symbol"):
        return None  # x \in S: a single symbol only
    if not value_text or any(_occurs(identifier, value_text) for identifier in identifiers):
        return None  # x = 2x - 3 is an equation, not a value
    value = canonical_form(value_text)
    if value.kind == "choice" or value.var:
        return None  # x = B, x = y = 3
    if value.kind == "number":
        return CanonicalAnswer("number", value.key, var=name, text=f"{name} = {value.text}", decimal=value.decimal,
                               value=value)
    return CanonicalAnswer("expr", text, var=name, text=strip_math_delimiters(answer), value=value)


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
        return CanonicalAnswer("number", str(value), text=_render(value, text), decimal="." in text)
    named = _named(text, answer)
    if named is not None:
        return named
    equation = "=" in text and list_structure(text) is None  # `(k = 0)` too: latex2sympy drops the brackets
    return CanonicalAnswer("expr", text, text=strip_math_delimiters(answer), equation=equation)


def _places(value: Fraction) -> int | None:
    """Decimal places of a terminating decimal, trailing zeros not counted; None if it does not terminate."""
    den, places = value.denominator, 0
    while den % 10 == 0:
        den //= 10
        places += 1
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    return places + max(twos, fives) if den == 1 else None


def _round6(value: Fraction) -> int | None:
    """``value`` rounded to 6 places (times 10**6); None at a tie, which rounding rules settle differently."""
    scaled = value * 10**6
    whole = scaled.numerator // scaled.denominator
    rest = scaled - whole
    return None if rest == Fraction(1, 2) else whole + (rest > Fraction(1, 2))


def decimal_rounds(decimal: Fraction, exact: Fraction) -> bool:
    """``decimal`` (written with a point) has >= 6 places, is ``exact`` rounded to them, and both round to the
    same 6 places without a tie (what math-verify compares: ``0.4545455`` is 5/11 to 7 places but rounds to
    0.454546 at 6, 5/11 to 0.454545, so they stay apart)."""
    places = _places(decimal)
    if places is None or places < 6 or decimal == 0 or 2 * abs(exact - decimal) * 10**places > 1:
        return False
    return _round6(decimal) is not None and _round6(decimal) == _round6(exact)


def numbers_equal(a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
    """Two ``number`` forms: same value (or a decimal and what it rounds), and the same name when both have one."""
    if a.var and b.var and a.var != b.var:
        return False
    if a.key == b.key:
        return True
    if a.decimal == b.decimal:
        return False
    decimal, exact = (a, b) if a.decimal else (b, a)
    return decimal_rounds(Fraction(decimal.key), Fraction(exact.key))


_OPEN = {"(": ")", "[": "]", "{": "}"}


def split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside (), [], {} and ``\\{ \\}``."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in "{}":
            depth += 1 if text[index + 1] == "{" else -1
            index += 2
            continue
        if char in _OPEN:
            depth += 1
        elif char in _OPEN.values():
            depth -= 1
        elif depth == 0 and text.startswith(separator, index) and (
                separator != "=" or (index == 0 or text[index - 1] not in "<>!\\") and not text.startswith("==", index)):
            parts.append(text[start:index])
            start = index + len(separator)
        index += 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


_BRACKET = re.compile(r"\\[{}]|[()\[\]{}]")


def _encloses(text: str, opener: str, closer: str) -> bool:
    """``text`` is one bracket group, from ``opener`` at its start to the matching ``closer`` at its end."""
    if not (text.startswith(opener) and text.endswith(closer)) or len(text) < len(opener) + len(closer):
        return False
    depth = 0
    for match in _BRACKET.finditer(text):
        depth += 1 if match.group() in ("\\{", "(", "[", "{") else -1
        if depth == 0:
            return match.end() == len(text)
    return False


_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


def list_structure(text: str) -> tuple[str, list[str]] | None:
    """(``list`` | ``set`` | ``tuple``, item texts) for an answer of two or more items, else None."""
    if _DECIMAL_COMMA.match(text) or text.endswith("."):
        return None  # 0,111 is a decimal comma to math-verify, and it reads `0, 1.` as 1: math-verify decides
    for kind, opener, closer in (("set", "\\{", "\\}"), ("tuple", "(", ")")):
        if _encloses(text, opener, closer):
            items = split_top_level(text[len(opener) : len(text) - len(closer)], ",")
            return (kind, [_unbox(item) for item in items]) if len(items) >= 2 and all(items) else None
    items = split_top_level(text, ",")
    return ("list", [_unbox(item) for item in items]) if len(items) >= 2 and all(items) else None
