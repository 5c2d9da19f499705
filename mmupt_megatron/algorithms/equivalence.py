"""When are two extracted answers the same answer? Symmetric, made for voting: no side is gold.

Two stages, so that the expensive one runs rarely:

1. ``canonical_form`` (``answer_forms``, ~µs) classifies each answer as an exact ``number``, a ``choice``
   letter or an ``expr``. Numbers and letters are decided there: equal values (and the same variable if
   both name one), the same letter; a letter never equals anything else.
2. math-verify (~ms) for pairs with an ``expr``. It reads each answer as ``$answer$`` (a number as its
   exact value), parsed once and cached. math-verify's ``verify(gold, pred)`` is not symmetric (it reduces
   an equation to its right-hand side only on the prediction side), so:
   - an equation never equals something that is not an equation, unless it is an assignment of one
     variable that does not occur on its right (``x = \\sqrt{2}`` equals ``\\sqrt{2}``;
     ``a + 3z = 0``, ``x + y = 1`` and ``7 = 11a + c`` equal no bare value); two equations compare as
     equations;
   - otherwise the pair is equal when ``verify`` says so in either direction (``0 < f(x) < 1`` and
     ``(0, 1)`` are equal whichever comes first).
   Before calling ``verify``, each parsed answer gets a numeric fingerprint (``fingerprints``: values with
   free symbols set to fixed numbers, of expressions, set elements, interval ends, equations up to a
   factor): different fingerprints settle most unequal pairs in microseconds.
   Each distinct pair's verdict is cached. Every call is bounded by ``timeout_s``; a timeout counts as "not
   equal" for that call only and is never cached (the next call tries again).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from mmupt_megatron.algorithms.answer_forms import (
    DELIBERATE_DIFFERENCES,
    AnswerKind,
    CanonicalAnswer,
    canonical_form,
    numbers_equal,
)
from mmupt_megatron.algorithms.fingerprints import Fingerprint, differ, fingerprint

__all__ = ["DELIBERATE_DIFFERENCES", "AnswerKind", "AnswerMatcher", "CanonicalAnswer", "canonical_form"]


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


def _equation_kind(parsed: list[Any]) -> str:
    """``none``, ``assignment`` (one variable, absent from the right side) or ``equation``."""
    from math_verify.grader import is_equation
    from sympy import Eq, Symbol

    expr = parsed[0] if parsed else None
    if expr is None or isinstance(expr, str) or not is_equation(expr):
        return "none"
    if isinstance(expr, Eq) and isinstance(expr.lhs, Symbol) and expr.lhs not in expr.rhs.free_symbols:
        return "assignment"
    return "equation"


class AnswerMatcher:
    """Symmetric equivalence of answers with per-form and per-pair caches (reuse one matcher across steps).

    ``use_math_verify=False`` keeps only the canonical-form stage (fast, exact-rational and letter aware;
    two expressions are equal only when their normalised texts are).
    """

    def __init__(self, *, use_math_verify: bool = True, timeout_s: float = 1.0, max_cache: int = 200_000):
        self.use_math_verify = use_math_verify
        self.timeout_s = timeout_s
        self.max_cache = max_cache
        self._forms: dict[str, CanonicalAnswer] = {}
        self._parsed: dict[str, list[Any]] = {}
        self._fingerprints: dict[str, Fingerprint | None] = {}
        self._pairs: dict[tuple[str, str], bool] = {}
        self.num_symbolic_calls = 0
        self.num_timeouts = 0

    def _bounded(self, cache: dict, key: Any, value: Any) -> Any:
        if len(cache) >= self.max_cache:
            cache.clear()
        cache[key] = value
        return value

    def form(self, answer: str) -> CanonicalAnswer:
        cached = self._forms.get(answer)
        return cached if cached is not None else self._bounded(self._forms, answer, canonical_form(answer))

    def _parse(self, text: str) -> list[Any]:
        """math-verify's reading of ``$text$`` (cached); raises _Timeout (never cached)."""
        if text not in self._parsed:
            parse, _ = _math_verify()
            try:
                parsed = _call_with_time_limit(lambda t: parse(f"${t}$", parsing_timeout=None), self.timeout_s, text)
            except _Timeout:
                self.num_timeouts += 1
                raise
            except Exception:  # noqa: BLE001  math-verify raises many kinds on malformed LaTeX: unparseable
                parsed = []
            self._bounded(self._parsed, text, parsed)
        return self._parsed[text]

    def _fingerprint(self, text: str) -> Fingerprint | None:
        if text not in self._fingerprints:
            parsed = self._parse(text)
            try:
                value = _call_with_time_limit(fingerprint, self.timeout_s, parsed[0]) if parsed else None
            except _Timeout:
                self.num_timeouts += 1
                return None  # no shortcut this time; not cached
            self._bounded(self._fingerprints, text, value)
        return self._fingerprints[text]

    def _verify(self, gold: list[Any], pred: list[Any]) -> bool:
        _, verify = _math_verify()
        self.num_symbolic_calls += 1
        try:
            return bool(_call_with_time_limit(lambda x, y: verify(x, y, timeout_seconds=None), self.timeout_s, gold, pred))
        except _Timeout:
            self.num_timeouts += 1
            raise
        except Exception:  # noqa: BLE001  an error inside verify is its "not equal"
            return False

    def _decide(self, text_a: str, text_b: str) -> bool:
        """math-verify's symmetric verdict on two texts (see module docstring); may raise _Timeout."""
        parsed_a, parsed_b = self._parse(text_a), self._parse(text_b)
        if not parsed_a or not parsed_b:
            return False
        kinds = {_equation_kind(parsed_a), _equation_kind(parsed_b)}
        if "none" in kinds and "equation" in kinds:
            return False  # an equation never equals a bare value
        if differ(self._fingerprint(text_a), self._fingerprint(text_b)):
            return False
        return self._verify(parsed_a, parsed_b) or self._verify(parsed_b, parsed_a)

    def _symbolic_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        pair = (a.text, b.text) if a.text <= b.text else (b.text, a.text)
        cached = self._pairs.get(pair)
        if cached is None:
            try:
                cached = self._bounded(self._pairs, pair, self._decide(*pair))
            except _Timeout:
                return False  # for this call only
        return cached

    def forms_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        if a.kind == "number" and b.kind == "number":
            return numbers_equal(a, b)
        if a == b:
            return True
        if a.kind != "expr" and b.kind != "expr":
            return False  # distinct letters, or a letter against a number
        if "choice" in (a.kind, b.kind) or not self.use_math_verify:
            return False
        return self._symbolic_equal(a, b)

    def equal(self, a: str, b: str) -> bool:
        return self.forms_equal(self.form(a), self.form(b))

    def cluster(self, answers: list[str]) -> list[int]:
        """Cluster ids (0..k-1, numbered by each cluster's smallest canonical form) for a list of answers.

        Answers with equal forms share a cluster; clusters joined by an equal pair merge. A form is
        represented by its smallest spelling, so the result depends only on the multiset of answers.
        """
        forms = [self.form(answer) for answer in answers]
        representative: dict[CanonicalAnswer, CanonicalAnswer] = {}
        for form in forms:
            if form not in representative or form.text < representative[form].text:
                representative[form] = form
        distinct = sorted(representative.values(), key=lambda f: (f.kind, f.key, f.var))
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
