"""When are two extracted answers the same answer? Symmetric, made for voting: no side is gold.

Three stages, so that the expensive one runs rarely:

1. ``canonical_form`` (``answer_forms``, ~µs) classifies each answer as an exact ``number``, a ``choice``
   letter or an ``expr``, and reads named values (``k = 45``, ``(p, q) = (3, 2)``, ``AB = 1``,
   ``f(x) = x^2``) and lists (``1, 2``, ``\\{1, 2\\}``, ``(1, 2, 3)``). Numbers and letters are decided
   there (equal values, a decimal of >= 6 places and the fraction it rounds, the same letter; a letter never
   equals anything else); a named value equals its value, and lists compare item by item (see
   ``answer_forms``).
2. ``exact_forms`` (~0.2 ms an answer, ~50 µs a pair, pure Python): the common symbolic forms (multiples of
   roots, pi multiples, rational expressions, lines and other polynomial equations, intervals and
   inequalities of one variable) decided exactly, giving math-verify's verdict where it can be sure of it.
3. math-verify (~ms to ~100 ms) for the rest. It reads each answer as ``$answer$`` (a number as its
   exact value), parsed once and cached. math-verify's ``verify(gold, pred)`` is not symmetric (it reduces
   an equation to its right-hand side only on the prediction side), so:
   - an equation never equals something that is not an equation, unless it is an assignment of one
     variable that does not occur on its right (``x = \\sqrt{2}`` equals ``\\sqrt{2}``;
     ``a + 3z = 0``, ``x + y = 1`` and ``7 = 11a + c`` equal no bare value); two equations compare as
     equations;
   - otherwise the pair is equal when ``verify`` says so in either direction (``0 < f(x) < 1`` and
     ``(0, 1)`` are equal whichever comes first).
   Before calling ``verify``, each parsed answer gets a numeric fingerprint (``fingerprints``): different
   fingerprints settle most unequal pairs in microseconds.

Each distinct pair's verdict is cached, across steps when one matcher is reused. Verdicts never depend on
the machine's load:
- work is bounded by the input, not by a clock: answers longer than ``MAX_VERIFY_CHARS`` or with huge
  powers / factorials (``_costly``) are never given to sympy (they equal only an identical answer);
- ``timeout_s`` bounds each math-verify call; a call that runs past it is counted (``num_timeouts``: the
  ``reward/equivalence_timeouts`` metric, see ``vote.VoteResult``) and run again without a limit before it
  decides, so a timeout costs time, never a different verdict.

``num_workers`` (>= 2) runs the math-verify stage of a batch's groups in a process pool
(``verify_pool``); the verdicts are the same with any number of workers.
"""

from __future__ import annotations

import re
import signal
import threading
from typing import Any, Self

from mmupt_megatron.algorithms.answer_forms import (
    DELIBERATE_DIFFERENCES,
    AnswerKind,
    CanonicalAnswer,
    canonical_form,
    list_structure,
    numbers_equal,
    presentation_stripped,
)
from mmupt_megatron.algorithms.exact_forms import ExactForm, decide, exact_form, same_set
from mmupt_megatron.algorithms.fingerprints import Fingerprint, differ, fingerprint

__all__ = ["DELIBERATE_DIFFERENCES", "AnswerKind", "AnswerMatcher", "CanonicalAnswer", "canonical_form"]

MAX_VERIFY_CHARS = 1000
_COSTLY = re.compile(
    r"\^\s*\{?\s*[-+]?\s*\d{5,}"  # 10^{100000}
    r"|\^\s*\{[^{}]*\^|\^\s*[\w{}]+\s*\^"  # power towers 9^{9^9}
    r"|\d{4,}\s*!|!\s*!"  # 1000!, double factorials
)


def _costly(text: str) -> bool:
    """Answers whose symbolic evaluation could run for minutes: decided by their text alone."""
    return len(text) > MAX_VERIFY_CHARS or _COSTLY.search(text) is not None


class _Timeout(BaseException):
    """BaseException, so that math-verify's broad ``except Exception`` handlers cannot swallow it."""


class NeedsMathVerify(Exception):
    """Raised in dry-run mode (``AnswerMatcher.prepare``) where a verdict needs math-verify."""


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


def _solutions(items: list[CanonicalAnswer]) -> bool:
    """``x = 1, x = 2``: every item names the same single variable."""
    return len({item.var for item in items}) == 1 and bool(items[0].var) and not items[0].var.startswith("(")


class AnswerMatcher:
    """Symmetric equivalence of answers with per-form and per-pair caches (reuse one matcher across steps).

    ``use_math_verify=False`` keeps only the canonical-form stage (fast, exact-rational and letter aware;
    two expressions are equal only when their normalised texts are). ``exact_fast_path=False`` sends every
    symbolic pair to math-verify (the reference the fast path is tested against). ``num_workers``: processes
    for the math-verify stage of ``prepare`` (0 or 1: in this process; -1: the machine's free cores,
    ``verify_pool.free_cores``). Call ``close()`` (or use ``with``) to stop the workers.
    """

    def __init__(
        self,
        *,
        use_math_verify: bool = True,
        timeout_s: float = 1.0,
        max_cache: int = 200_000,
        num_workers: int = 0,
        exact_fast_path: bool = True,
    ):
        if num_workers < -1:
            raise ValueError(f"num_workers must be >= -1 (-1: the free cores), got {num_workers}")
        self.use_math_verify = use_math_verify
        self.timeout_s = timeout_s
        self.max_cache = max_cache
        self.exact_fast_path = exact_fast_path
        self.num_workers = num_workers
        self._forms: dict[str, CanonicalAnswer] = {}
        self._lists: dict[str, tuple[str, list[CanonicalAnswer]] | None] = {}
        self._exact: dict[str, ExactForm | None] = {}
        self._parsed: dict[str, list[Any]] = {}
        self._fingerprints: dict[str, Fingerprint | None] = {}
        self._pairs: dict[tuple[str, str], bool] = {}
        self._journal: list[tuple[tuple[str, str], bool]] | None = None
        self._dry_run = False
        self._pool: Any = None
        self.num_symbolic_calls = 0
        """math-verify ``verify`` calls."""
        self.num_fast_decisions = 0
        """Pairs decided by the exact fast path."""
        self.num_timeouts = 0
        """math-verify calls that ran past ``timeout_s`` (each was run again without a limit)."""

    # -- lifecycle ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker processes (if any); the matcher keeps working in this process."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None  # processes do not travel; a copy starts its own when it needs one
        return state

    def settings(self) -> dict[str, Any]:
        """The arguments that decide verdicts (what a worker's matcher is built with)."""
        return {"use_math_verify": self.use_math_verify, "timeout_s": self.timeout_s, "max_cache": self.max_cache,
                "exact_fast_path": self.exact_fast_path}

    # -- caches -------------------------------------------------------------------------------------------
    def _bounded(self, cache: dict, key: Any, value: Any) -> Any:
        if len(cache) >= self.max_cache:
            cache.clear()
        cache[key] = value
        return value

    def form(self, answer: str) -> CanonicalAnswer:
        cached = self._forms.get(answer)
        return cached if cached is not None else self._bounded(self._forms, answer, canonical_form(answer))

    def _list(self, form: CanonicalAnswer) -> tuple[str, list[CanonicalAnswer]] | None:
        if form.kind != "expr" or form.var:
            return None
        if form.key not in self._lists:
            structure = list_structure(form.key)
            value = None if structure is None else (structure[0], [self.form(item) for item in structure[1]])
            self._bounded(self._lists, form.key, value)
        return self._lists[form.key]

    def _exact_form(self, text: str) -> ExactForm | None:
        if text not in self._exact:
            self._bounded(self._exact, text, None if _costly(text) else exact_form(presentation_stripped(text)))
        return self._exact[text]

    # -- math-verify, bounded and retried -----------------------------------------------------------------
    def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` within ``timeout_s``; past it: counted, and run again without a limit."""
        try:
            return _call_with_time_limit(fn, self.timeout_s, *args)
        except _Timeout:
            self.num_timeouts += 1
        return fn(*args)

    def _parse(self, text: str) -> list[Any]:
        """math-verify's reading of ``$text$`` (cached); [] for an unparseable or too costly answer."""
        if text not in self._parsed:
            parsed: list[Any] = []
            if not _costly(text):
                parse, _ = _math_verify()
                try:
                    parsed = self._run(lambda t: parse(f"${t}$", parsing_timeout=None), text)
                except Exception:  # noqa: BLE001  math-verify raises many kinds on malformed LaTeX: unparseable
                    parsed = []
            self._bounded(self._parsed, text, parsed)
        return self._parsed[text]

    def _fingerprint(self, text: str) -> Fingerprint | None:
        if text not in self._fingerprints:
            parsed = self._parse(text)
            self._bounded(self._fingerprints, text, self._run(fingerprint, parsed[0]) if parsed else None)
        return self._fingerprints[text]

    def _verify(self, gold: list[Any], pred: list[Any]) -> bool:
        _, verify = _math_verify()
        self.num_symbolic_calls += 1
        try:
            return bool(self._run(lambda x, y: verify(x, y, timeout_seconds=None), gold, pred))
        except Exception:  # noqa: BLE001  an error inside verify is its "not equal"
            return False

    def _decide_math_verify(self, text_a: str, text_b: str) -> bool:
        """math-verify's symmetric verdict on two texts (see module docstring)."""
        parsed_a, parsed_b = self._parse(text_a), self._parse(text_b)
        if not parsed_a or not parsed_b:
            return False
        kinds = {_equation_kind(parsed_a), _equation_kind(parsed_b)}
        if "none" in kinds and "equation" in kinds:
            return False  # an equation never equals a bare value
        if differ(self._fingerprint(text_a), self._fingerprint(text_b)):
            return False
        return self._verify(parsed_a, parsed_b) or self._verify(parsed_b, parsed_a)

    def _decide(self, text_a: str, text_b: str) -> bool:
        if same_set(self._exact_form(text_a), self._exact_form(text_b)):
            return True  # one inequality in other words (a deliberate difference from math-verify)
        if self.exact_fast_path:
            verdict = decide(self._exact_form(text_a), self._exact_form(text_b))
            if verdict is not None:
                self.num_fast_decisions += 1
                return verdict
        if self._dry_run:
            raise NeedsMathVerify
        return self._decide_math_verify(text_a, text_b)

    def _symbolic_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        pair = (a.text, b.text) if a.text <= b.text else (b.text, a.text)
        cached = self._pairs.get(pair)
        if cached is None:
            cached = self._bounded(self._pairs, pair, self._decide(*pair))
            if self._journal is not None:
                self._journal.append((pair, cached))
        return cached

    # -- the rules ----------------------------------------------------------------------------------------
    def _named_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool | None:
        """A named value against its value or another named value (None: the whole answers decide)."""
        if a.var and b.var:
            return self.forms_equal(a.value, b.value) if a.var == b.var else None  # type: ignore[arg-type]
        named, other = (a, b) if a.var else (b, a)
        if not named.var or other.equation:
            return None
        items = self._list(other)
        if items is not None and any(item.var for item in items[1]):
            return None  # x = 1, y = 2 against (p, q) = (1, 2): names would have to be matched
        return self.forms_equal(named.value, other)  # type: ignore[arg-type]

    def _lists_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool | None:
        """Two lists item by item (None when one is not a list, or for a set against a tuple).

        As multisets when one is a set (``\\{1, 2\\}``) or a list of solutions of one variable
        (``x = 1, x = 2``); in order otherwise (a tuple, and a bare list against a bare list or a tuple:
        ``3, 2`` may be the ordered answer (p, q), and a wrong order must not share its reward)."""
        list_a, list_b = self._list(a), self._list(b)
        if list_a is None or list_b is None:
            return None
        (kind_a, items_a), (kind_b, items_b) = sorted((list_a, list_b), key=lambda x: (x[0], [f.key for f in x[1]]))
        if {kind_a, kind_b} == {"set", "tuple"}:
            return None  # math-verify's rules for sets against tuples (intervals) apply
        if kind_b == "tuple" and kind_a == "list" and len({(f.kind, f.key, f.var) for f in items_a}) < len(items_a):
            return None  # `3, 3` is the set {3} to math-verify: it decides against (3, 3)
        if len(items_a) != len(items_b):
            return False
        unordered = "set" in (kind_a, kind_b) or "tuple" not in (kind_a, kind_b) and (
            _solutions(items_a) or _solutions(items_b))
        if not unordered:
            return all(self.forms_equal(x, y) for x, y in zip(items_a, items_b, strict=True))
        unmatched = list(items_b)
        for item in items_a:
            match = next((i for i, other in enumerate(unmatched) if self.forms_equal(item, other)), None)
            if match is None:
                return False
            unmatched.pop(match)
        return True

    def forms_equal(self, a: CanonicalAnswer, b: CanonicalAnswer) -> bool:
        if a.kind == "number" and b.kind == "number":
            return numbers_equal(a, b)
        if a == b:
            return True
        if a.kind == "choice" or b.kind == "choice":
            return False  # distinct letters, or a letter against anything else
        for rule in (self._named_equal, self._lists_equal):
            verdict = rule(a, b)
            if verdict is not None:
                return verdict
        if not self.use_math_verify:
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

    # -- batches ------------------------------------------------------------------------------------------
    def _workers(self) -> Any:
        if self._pool is None:
            from mmupt_megatron.algorithms.verify_pool import VerifyPool

            self._pool = VerifyPool(self.num_workers, self.settings())
        return self._pool

    def start_workers(self) -> int:
        """Start the worker processes now (each imports math-verify: seconds) rather than in the first vote
        that needs them; returns how many there are (0 when this matcher works in-process)."""
        if self.num_workers in (0, 1) or not self.use_math_verify:
            return 0
        pool = self._workers()
        return pool.num_workers if pool.start() else 0

    def needs_math_verify(self, answers: list[str]) -> bool:
        """Whether clustering these answers needs a math-verify call (everything else is cached by the way)."""
        if not self.use_math_verify:
            return False
        self._dry_run = True
        try:
            self.cluster(answers)
        except NeedsMathVerify:
            return True
        finally:
            self._dry_run = False
        return False

    def prepare(self, groups: list[list[str]]) -> None:
        """Decide, in the worker processes, the math-verify pairs that clustering these groups will ask for.

        Afterwards ``cluster`` on each group reads its verdicts from the cache. A no-op without workers, or
        when fewer than two groups need math-verify.
        """
        if self.num_workers in (0, 1) or not self.use_math_verify:
            return
        pending = [group for group in groups if self.needs_math_verify(group)]
        if len(pending) < 2 or self._workers().num_workers < 2:
            return
        for verdicts, timeouts, calls, fast in self._pool.cluster(pending):
            for pair, verdict in verdicts:
                self._bounded(self._pairs, pair, verdict)
            self.num_timeouts += timeouts
            self.num_symbolic_calls += calls
            self.num_fast_decisions += fast
