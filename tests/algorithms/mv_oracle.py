"""The reference for the differential tests: math-verify 0.9.0 with its defaults, in both directions.

``mv_equal(a, b)``: ``verify(parse($a$), parse($b$))`` or the same with the sides swapped (each answer is
read as inline math, as the matcher reads it: math delimiters already around it are replaced by ``$``). ``deliberate(text)`` rewrites the spellings that
``answer_forms.DELIBERATE_DIFFERENCES`` reads differently from math-verify into the spelling math-verify
reads our way (a one-variable inequality of numbers becomes its interval); a pair we call equal must be
equal to math-verify as written or after that rewrite.
"""

from __future__ import annotations

import re
from functools import cache

from math_verify import parse, verify

_DELIMITERS = re.compile(r"^\s*(?:\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\])\s*$", re.DOTALL)
_TEXT = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}$")


def _unwrapped(text: str, pattern: re.Pattern = _DELIMITERS) -> str:
    match = pattern.match(text.strip())
    while match:
        text = next(g for g in match.groups() if g is not None).strip()
        match = pattern.match(text)
    return text.strip()


@cache
def _parsed(text: str) -> tuple:
    return tuple(parse(f"${_unwrapped(text)}$"))


@cache
def mv_equal(a: str, b: str) -> bool:
    pa, pb = list(_parsed(a)), list(_parsed(b))
    return verify(pa, pb) or verify(pb, pa)


_PREFIX = r"^(?P<pre>(?:[A-Za-z] ?= ?)?[+-]? ?)"
_REWRITES = (
    (re.compile(r"^(?:\\(?:text|textbf|mathrm|mathbf)\{([A-J])\}|([A-J])) ?[.)]$"), r"\1\2"),  # letter B. / B)
    (re.compile(_PREFIX + r"(?P<num>[1-9]\d{0,2}(?:(?: |\\,)\d{3})+)(?P<rest>(?:\.\d+)?\D*)$"),
     lambda m: m["pre"] + re.sub(r" |\\,", "", m["num"]) + m["rest"]),  # 1 234
    (re.compile(_PREFIX + r"(?P<whole>\d+) (?P<num>\d+)/(?P<den>\d+)(?P<rest>\D*)$"),
     lambda m: f"{m['pre']}{m['whole']}\\frac{{{m['num']}}}{{{m['den']}}}{m['rest']}"),  # 4 4/9
    (re.compile(r"^(.*\d) ?(?:percent|percentage|pct|(?<!\\)%)$"), r"\1\\%"),  # 12.5 percent, 12.5%
    (re.compile(r"\\overline ?\{ ?([A-Z]{2}) ?\}"), r"\1"),  # \overline{AB}
)


_NUM = r"-?\d+(?:\.\d+)?"
_LESS = {"<": "<", "\\lt": "<", "\\le": "<=", "\\leq": "<="}
_MORE = {">": ">", "\\gt": ">", "\\ge": ">=", "\\geq": ">="}
_OP = "|".join(re.escape(op) for op in (*_LESS, *_MORE))
_CHAIN = re.compile(rf"^(?P<a>{_NUM}) ?(?P<op1>{_OP}) ?(?P<v>[a-z]) ?(?P<op2>{_OP}) ?(?P<b>{_NUM})$")
_HALF = re.compile(rf"^(?:(?P<v1>[a-z]) ?(?P<op1>{_OP}) ?(?P<b1>{_NUM})|(?P<b2>{_NUM}) ?(?P<op2>{_OP}) ?(?P<v2>[a-z]))$")


def _as_interval(text: str) -> str:
    """A one-variable inequality (chain) of numbers as the interval it describes (``exact_forms.same_set``)."""
    chain = _CHAIN.match(text)
    if chain and chain["op1"] in _LESS and chain["op2"] in _LESS:
        low, high, lo_op, hi_op = chain["a"], chain["b"], _LESS[chain["op1"]], _LESS[chain["op2"]]
    elif chain and chain["op1"] in _MORE and chain["op2"] in _MORE:
        low, high, lo_op, hi_op = chain["b"], chain["a"], _MORE[chain["op2"]], _MORE[chain["op1"]]
    else:
        half = _HALF.match(text)
        if not half:
            return text
        op = half["op1"] or {**{k: v for k, v in zip(_LESS, [">", ">", ">=", ">="], strict=True)},
                             **{k: v for k, v in zip(_MORE, ["<", "<", "<=", "<="], strict=True)}}[half["op2"]]
        bound = half["b1"] or half["b2"]
        if op in _MORE or op in (">", ">="):
            return f"{'(' if _MORE.get(op, op) == '>' else '['}{bound}, \\infty)"
        return f"(-\\infty, {bound}{')' if _LESS.get(op, op) == '<' else ']'}"
    return f"{'(' if lo_op in ('<', '>') else '['}{low}, {high}{')' if hi_op in ('<', '>') else ']'}"


def deliberate(text: str) -> str:
    """The rewrite, applied to the answer without math delimiters and ``\\text{}``; unchanged if none applies."""
    inner = _unwrapped(_unwrapped(re.sub(r"^\\displaystyle\s*", "", _unwrapped(text))), _TEXT)
    rewritten = _as_interval(inner)
    for pattern, replacement in _REWRITES:
        rewritten = pattern.sub(replacement, rewritten)
    return rewritten if rewritten != inner else text


def allowed_equal(a: str, b: str) -> bool:
    """May the matcher call ``a`` and ``b`` equal? (math-verify does, as written or after ``deliberate``)."""
    return mv_equal(a, b) or mv_equal(deliberate(a), deliberate(b))
