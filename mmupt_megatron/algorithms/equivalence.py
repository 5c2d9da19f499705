"""When are two extracted answers the same answer?

Two stages, so that the expensive one runs rarely:

1. ``canonical_form`` (pure string/number work, ~µs): strips presentation (whitespace, ``\\left``/``\\right``,
   ``\\dfrac``/``\\tfrac``, ``\\text{}``, ``$``, degree and percent signs, thousands separators, a leading
   ``x =``) and classifies the answer as
   - ``number``: an exact rational (``0.50``, ``1/2``, ``\\frac{1}{2}`` and ``.5`` all become ``1/2``),
   - ``choice``: a multiple-choice letter (``(B)``, ``B.``, ``B) 45``, ``option B`` become ``B``),
   - ``expr``: anything else, kept as its normalised text.
   Equal canonical forms are equal answers. Two different numbers, two different letters, or a letter and
   anything else are never equal, so no symbolic check is needed for them.
2. ``math-verify`` (~ms) only for the remaining pairs that involve an ``expr``: each distinct form is parsed
   once and each distinct pair compared once (both cached), with a bounded time per call; a timeout or a
   parse failure counts as "not equal". Before the (slow, simplify-based) comparison, each parsed form
   gets a numeric fingerprint (its value, with free symbols set to fixed irrational-ish values): two
   forms whose fingerprints differ cannot be equal, which settles most unequal pairs in microseconds.
"""

from __future__ import annotations

import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

AnswerKind = Literal["number", "choice", "expr"]


@dataclass(frozen=True, slots=True)
class CanonicalAnswer:
    kind: AnswerKind
    key: str


_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|~|\\quad|\\qquad")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\circ")
_PERCENT = re.compile(r"\\?%")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_CHOICE = re.compile(
    r"^(?:(?i:option|choice|answer)\s*)?[\(\[]?([A-J])[\)\]]?(?:\s*[.:)]\s*.*|\s+.*)?$"
)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_SLASH_FRACTION = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")
_LATEX_FRACTION = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$|^([+-]?)\\frac(\d)(\d)$")


def _strip_presentation(answer: str) -> str:
    text = answer.strip()
    for opener, closer in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while text.startswith(opener) and text.endswith(closer) and len(text) >= len(opener) + len(closer):
            text = text[len(opener) : len(text) - len(closer)].strip()
    previous = None
    while previous != text:  # \text{\textbf{x}} needs two passes
        previous = text
        text = _WRAPPERS.sub(r"\1", text)
    text = _LEFT_RIGHT.sub("", text)
    text = _SPACING.sub(" ", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREES.sub("", text)
    text = _PERCENT.sub("", text)
    text = text.strip().rstrip(".").strip()
    return text


def _as_number(text: str) -> Fraction | None:
    compact = text.replace(" ", "")
    if _THOUSANDS.match(compact):
        compact = compact.replace(",", "")
    if _DECIMAL.match(compact):
        return Fraction(compact)
    match = _SLASH_FRACTION.match(compact)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    match = _LATEX_FRACTION.match(compact)
    if match:
        sign, num, den = (match.group(1), match.group(2), match.group(3))
        if num is None:
            sign, num, den = match.group(4), match.group(5), match.group(6)
        if int(den) != 0:
            value = Fraction(int(num), int(den))
            return -value if sign == "-" else value
    return None


def canonical_form(answer: str) -> CanonicalAnswer:
    """Classify and normalise one extracted answer (see module docstring)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = _strip_presentation(answer)
    choice = _CHOICE.match(text)
    if choice:
        return CanonicalAnswer("choice", choice.group(1).upper())
    text = _ASSIGNMENT.sub("", text)
    number = _as_number(text)
    if number is not None:
        return CanonicalAnswer("number", str(number))
    return CanonicalAnswer("expr", re.sub(r"\s+", "", text))


class _Timeout(BaseException):
    """BaseException, so that math-verify's broad ``except Exception`` handlers cannot swallow it."""


def _call_with_time_limit(fn: Any, seconds: float, *args: Any) -> Any:
    """Run ``fn(*args)``; raise _Timeout after ``seconds`` (main thread only: SIGALRM with a float timer).

    Outside the main thread a signal cannot interrupt the call; it then runs unbounded (math-verify's own
    limit has the same restriction). Ray's synchronous actors run methods on the main thread.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return fn(*args)

    def _on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # restore the handler even if the alarm fired during the line above
            signal.signal(signal.SIGALRM, previous)


def _math_verify() -> tuple[Any, Any]:
    """math-verify's parse and verify (imported lazily: sympy costs ~1 s to import).

    We call them with their own signal-based timeouts off and bound the time ourselves (fractional
    seconds), so their one-time "timeout is disabled" warning is switched off as well.
    """
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify.parser.parse, math_verify.grader.verify


def _numeric_value(expr: Any) -> complex | None:
    """The value of a sympy expression with its free symbols set to fixed, unlikely values."""
    substitutions = {
        symbol: 0.5772156649 + 0.1 * (sum(map(ord, str(symbol))) % 97) for symbol in expr.free_symbols
    }
    value = complex(expr.subs(substitutions).evalf())
    return value if value == value else None  # NaN: no fingerprint


class AnswerMatcher:
    """Equivalence of answers with per-form and per-pair caches (reuse one matcher across steps).

    ``use_math_verify=False`` keeps only the canonical-form stage (fast, exact-rational and letter aware).
    """

    def __init__(self, *, use_math_verify: bool = True, timeout_s: float = 1.0, max_cache: int = 200_000):
        self.use_math_verify = use_math_verify
        self.timeout_s = timeout_s
        self.max_cache = max_cache
        self._forms: dict[str, CanonicalAnswer] = {}
        self._parsed: dict[str, Any] = {}
        self._fingerprints: dict[str, complex | None] = {}
        self._pairs: dict[tuple[str, str], bool] = {}
        self.num_symbolic_calls = 0
        self.num_timeouts = 0

    def form(self, answer: str) -> CanonicalAnswer:
        cached = self._forms.get(answer)
        if cached is None:
            if len(self._forms) >= self.max_cache:
                self._forms.clear()
            cached = self._forms[answer] = canonical_form(answer)
        return cached

    def _parse(self, key: str) -> Any:
        if key not in self._parsed:
            parse, _ = _math_verify()
            try:
                self._parsed[key] = _call_with_time_limit(
                    lambda text: parse(f"${text}$", parsing_timeout=None), self.timeout_s, key
                )
            except _Timeout:
                self.num_timeouts += 1
                self._parsed[key] = []
            except Exception:  # math-verify raises many kinds on malformed LaTeX: treat as unparseable
                self._parsed[key] = []
        return self._parsed[key]

    def _fingerprint(self, key: str) -> complex | None:
        if key not in self._fingerprints:
            parsed = self._parse(key)
            value = None
            if parsed and hasattr(parsed[0], "free_symbols"):
                try:
                    value = _call_with_time_limit(_numeric_value, self.timeout_s, parsed[0])
                except _Timeout:
                    self.num_timeouts += 1
                except Exception:  # sets, equations, matrices...: no fingerprint, math-verify decides
                    value = None
            self._fingerprints[key] = value
        return self._fingerprints[key]

    def _symbolic_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        pair = (a.key, b.key) if a.key <= b.key else (b.key, a.key)
        if pair not in self._pairs:
            _, verify = _math_verify()
            parsed_a, parsed_b = self._parse(pair[0]), self._parse(pair[1])
            value_a, value_b = self._fingerprint(pair[0]), self._fingerprint(pair[1])
            if not parsed_a or not parsed_b or value_a is not None and value_b is not None and abs(value_a - value_b) > 1e-6 * max(
                1.0, abs(value_a)
            ):
                result = False
            else:
                self.num_symbolic_calls += 1
                try:
                    result = bool(
                        _call_with_time_limit(
                            lambda x, y: verify(x, y, timeout_seconds=None), self.timeout_s, parsed_a, parsed_b
                        )
                    )
                except _Timeout:
                    self.num_timeouts += 1
                    result = False
                except Exception:
                    result = False
            if len(self._pairs) >= self.max_cache:
                self._pairs.clear()
            self._pairs[pair] = result
        return self._pairs[pair]

    def forms_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        if a == b:
            return True
        if a.kind != "expr" and b.kind != "expr":
            return False  # distinct exact numbers / letters, or a letter against a number
        if "choice" in (a.kind, b.kind) or not self.use_math_verify:
            return False
        return self._symbolic_equal(a, b)

    def equal(self, a: str, b: str) -> bool:
        return self.forms_equal(self.form(a), self.form(b))

    def cluster(self, answers: list[str]) -> list[int]:
        """Cluster ids (0..k-1, numbered by each cluster's smallest canonical key) for a list of answers."""
        forms = [self.form(answer) for answer in answers]
        distinct = sorted(set(forms), key=lambda f: (f.kind, f.key))
        parent = list(range(len(distinct)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(distinct)):
            for j in range(i + 1, len(distinct)):
                if root(i) != root(j) and self.forms_equal(distinct[i], distinct[j]):
                    parent[max(root(i), root(j))] = min(root(i), root(j))
        roots = sorted({root(i) for i in range(len(distinct))})
        cluster_of_root = {r: n for n, r in enumerate(roots)}
        cluster_of_form = {form: cluster_of_root[root(i)] for i, form in enumerate(distinct)}
        return [cluster_of_form[form] for form in forms]
