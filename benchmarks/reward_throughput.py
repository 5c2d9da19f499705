"""Majority-vote reward throughput: ours vs the original MM-UPT method, same process, same data.

    .venv/bin/python benchmarks/reward_throughput.py [--responses 10000] [--expression-responses 2000]
        [--group-size 10] [--seed 0] [--batches mixed expressions expressions-heldout expressions-fresh] [--workers N]
        [--no-reference]

Four batches, one table each:
- ``mixed``: groups of responses to imaginary questions whose true answers are integers, fractions,
  decimals, LaTeX expressions or multiple-choice letters;
- ``expressions``: answers that are roots, equations (lines) and open intervals, a fresh value for each
  question, the forms the exact fast path (``exact_forms``) was written for;
- ``expressions-heldout``: the same kinds of value in other spellings, written after the fast path's first
  version: roots as ``\\sqrt{k} \\cdot c``, ``c\\times\\sqrt{k}``, ``\\frac{2c\\sqrt{k}}{2}``, ``\\sqrt{k}\\,c``;
  lines as ``ax + b = y``, ``-ax + y = b``, ``y = \\frac{2ax + 2b}{2}``; intervals as ``hi > x > lo``,
  ``( lo, hi )``, ``x\\in\\left(lo, hi\\right)``. Its first measurement (691 responses/s, 93 math-verify calls)
  led to two changes (a number after a root, ``\\sqrt{k}\\,c``; one inequality in other words): it is no
  longer data the fast path was not tuned on;
- ``expressions-fresh``: other spellings again, written after the last change to the fast path and measured
  once, as they came: roots as ``({c^2 k})^{1/2}``, ``c \\cdot k^{1/2}``, ``\\sqrt{k} + (c-1)\\sqrt{k}``;
  lines as ``y - ax - b = 0``, ``\\frac{y - b}{a} = x``, ``ax = y - b``; intervals as ``(lo,\\ hi)``,
  ``\\{x \\mid lo < x < hi\\}``, ``x > lo \\text{ and } x < hi``.
Each response states one candidate value in a random equivalent spelling (``0.5`` / ``\\frac{1}{2}`` /
``1/2``, ``0 < x < 1`` / ``(0, 1)`` ...), or gives no answer (no box, or a box cut off). Ground truth:
which responses *should* be rewarded, i.e. state the value that most responses of the group state (exact,
from the generator's value ids).

Methods (each row on the same responses, in the same process):
- baseline (original MM-UPT): ``mathruler.extract_boxed_content``, ``Counter`` over the raw strings
  (``"None"`` votes like an answer), then one ``mathruler.grade_answer`` per response against the winner;
- math-verify path: ``extract_answers`` + ``majority_vote`` with ``AnswerMatcher(exact_fast_path=False)``:
  canonical forms, then math-verify for every distinct symbolic pair (the method before the fast path);
- ours, in-process: the same with the exact fast path (``num_workers=0``);
- ours, N workers: the same with the math-verify stage in N worker processes (started before timing).
Agreement = fraction of responses whose reward equals the ground truth. "verdicts = math-verify path": the
fraction of distinct answer pairs within groups on which the row's matcher says what the math-verify
path's says (skipped with ``--no-reference``, which also drops that row: it is the slow one).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmupt_megatron.algorithms import AnswerMatcher, extract_answers, majority_vote

# value id -> equivalent spellings
_FRACTIONS = {(1, 2): ["0.5", r"\frac{1}{2}", "1/2", r"\dfrac{1}{2}", ".5"],
              (3, 4): ["0.75", r"\frac{3}{4}", "3/4", r"\tfrac34"],
              (2, 5): ["0.4", r"\frac{2}{5}", "2/5", "0.40"],
              (5, 2): ["2.5", r"\frac{5}{2}", "5/2", "2.50"]}
_EXPRESSIONS = {"sqrt2": [r"\sqrt{2}", r"2^{1/2}", r"\frac{2}{\sqrt{2}}"],
                "2pi": [r"2\pi", r"\pi \cdot 2", r"2 \pi"],
                "sqrt3/2": [r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", r"\sqrt{3}/2"],
                "x+1": ["x+1", "1+x", "x + 1"]}
_SYMBOLIC = {"expr": _EXPRESSIONS}
BATCHES = {"mixed": ["int", "frac", "decimal", "expr", "choice"], "expressions": ["root", "equation", "interval"],
           "expressions-heldout": ["root-heldout", "equation-heldout", "interval-heldout"],
           "expressions-fresh": ["root-fresh", "equation-fresh", "interval-fresh"]}


def _roots(c: int, k: int) -> list[str]:  # c * sqrt(k)
    first = [f"\\sqrt{{{k}}}", f"{k}^{{1/2}}"] if c == 1 else [f"{c}\\sqrt{{{k}}}", f"{c} \\sqrt{{{k}}}"]
    return [*first, f"\\sqrt{{{c * c * k}}}", f"\\frac{{{c * k}}}{{\\sqrt{{{k}}}}}", f"{c} \\cdot \\sqrt{{{k}}}"]


def _lines(a: int, b: int) -> list[str]:  # y = a x + b
    return [f"y = {a}x + {b}", f"y={b}+{a}x", f"{a}x - y + {b} = 0", f"y - {b} = {a}x"]


def _intervals(lo: int, hi: int) -> list[str]:  # open interval (lo, hi)
    return [f"({lo}, {hi})", f"({lo},{hi})", f"{lo} < x < {hi}", f"x \\in ({lo},{hi})", f"\\left({lo},{hi}\\right)"]


def _roots_heldout(c: int, k: int) -> list[str]:  # c * sqrt(k), other spellings
    return [f"\\sqrt{{{k}}} \\cdot {c}", f"\\sqrt{{{k * c * c}}}", f"{c}\\times\\sqrt{{{k}}}", f"\\frac{{{2 * c}\\sqrt{{{k}}}}}{{2}}",
            f"\\sqrt{{{k}}}\\,{c}" if c > 1 else f"\\sqrt{{{k}}}"]


def _lines_heldout(a: int, b: int) -> list[str]:  # y = a x + b, other spellings
    return [f"{a}x + {b} = y", f"-{a}x + y = {b}", f"y = \\frac{{{2 * a}x + {2 * b}}}{{2}}", f"y-{a}x={b}", f"y = {b} + {a} x"]


def _intervals_heldout(lo: int, hi: int) -> list[str]:  # open interval (lo, hi), other spellings
    return [f"{hi} > x > {lo}", f"\\left( {lo} , {hi} \\right)", f"{lo}<x<{hi}", f"( {lo}, {hi} )", f"x\\in\\left({lo}, {hi}\\right)"]


def _roots_fresh(c: int, k: int) -> list[str]:  # c * sqrt(k), written after the last fast-path change
    return [f"({c * c * k})^{{1/2}}", f"{c} \\cdot {k}^{{1/2}}", f"\\sqrt{{{k}}} + {c - 1}\\sqrt{{{k}}}", f"{c}\\sqrt{{{k}}}"]


def _lines_fresh(a: int, b: int) -> list[str]:  # y = a x + b
    return [f"y - {a}x - {b} = 0", f"\\frac{{y - {b}}}{{{a}}} = x", f"{a}x = y - {b}", f"y = {a}x + {b}"]


def _intervals_fresh(lo: int, hi: int) -> list[str]:  # open interval (lo, hi)
    return [f"({lo},\\ {hi})", f"\\{{x \\mid {lo} < x < {hi}\\}}", f"x > {lo} \\text{{ and }} x < {hi}", f"({lo}, {hi})"]


# kind -> (draw one value, its equivalent spellings): a fresh value per question, so no cache carries over
_DRAW = {
    "root": lambda rng: (rng.randint(1, 9), rng.choice([2, 3, 5, 6, 7, 10, 11])),
    "equation": lambda rng: (rng.randint(1, 9), rng.choice([-1, 1]) * rng.randint(1, 9)),
    "interval": lambda rng: (lo := rng.randint(-9, 5), lo + rng.randint(1, 9)),
}
_GENERATED = {
    "root": (_DRAW["root"], _roots),
    "equation": (_DRAW["equation"], _lines),
    "interval": (_DRAW["interval"], _intervals),
    "root-heldout": (_DRAW["root"], _roots_heldout),
    "equation-heldout": (_DRAW["equation"], _lines_heldout),
    "interval-heldout": (_DRAW["interval"], _intervals_heldout),
    "root-fresh": (_DRAW["root"], _roots_fresh),
    "equation-fresh": (_DRAW["equation"], _lines_fresh),
    "interval-fresh": (_DRAW["interval"], _intervals_fresh),
}


def spellings(kind: str, value: object) -> list[str]:
    if kind == "int":
        return [str(value), f"{value}.0", f"{value}^\\circ" if value < 90 else f"{value:,}", f"x = {value}"]
    if kind == "frac":
        return _FRACTIONS[value]  # type: ignore[index]
    if kind == "decimal":
        return [f"{value:.1f}", f"{value:.2f}", f"{value:.3f}"]
    if kind in _SYMBOLIC:
        return _SYMBOLIC[kind][value]  # type: ignore[index]
    if kind in _GENERATED:
        return _GENERATED[kind][1](*value)  # type: ignore[misc]
    return [value, f"({value})", f"{value}.", f"\\text{{({value})}}"]  # type: ignore[list-item]


def candidate_values(kind: str, rng: random.Random) -> list[object]:
    if kind == "int":
        return rng.sample(range(2, 2000), 4)
    if kind == "frac":
        return rng.sample(list(_FRACTIONS), 3)
    if kind == "decimal":
        return [round(rng.uniform(0, 100), 1) for _ in range(3)]
    if kind in _SYMBOLIC:
        return rng.sample(list(_SYMBOLIC[kind]), 3)
    if kind in _GENERATED:
        values: set[tuple] = set()
        while len(values) < 3:
            values.add(_GENERATED[kind][0](rng))
        return sorted(values)
    return rng.sample(list("ABCDE"), 3)


def make_data(num_responses: int, group_size: int, seed: int, kinds: list[str]) -> tuple[list[str], list[int], list[float]]:
    rng = random.Random(seed)
    responses, group_ids, truth = [], [], []
    for group in range(num_responses // group_size):
        kind = rng.choice(kinds)
        values = candidate_values(kind, rng)
        weights = [rng.uniform(0.5, 3.0) for _ in values]
        picked: list[object | None] = []
        for _ in range(group_size):
            if rng.random() < 0.1:
                picked.append(None)
            else:
                picked.append(rng.choices(values, weights)[0])
        counts = Counter(v for v in picked if v is not None)
        top = max(counts.values()) if counts else 0
        winners = [v for v, c in counts.items() if c == top]
        for value in picked:
            if value is None:
                responses.append(rng.choice(["I am not sure.", r"so the answer is \boxed{12"]))
            else:
                responses.append(f"Reasoning ... so the answer is \\boxed{{{rng.choice(spellings(kind, value))}}}.")
            group_ids.append(group)
            # ties make the true reward ambiguous: count either winner as right (both methods get the benefit)
            truth.append(1.0 if value is not None and value in winners and len(winners) == 1 else
                         (-1.0 if value is not None and value in winners else 0.0))
    return responses, group_ids, truth


def agreement(rewards: list[float], truth: list[float]) -> float:
    ok = sum(1 for r, t in zip(rewards, truth, strict=True) if t < 0 or r == t)
    return ok / len(truth)


def baseline(responses: list[str], group_ids: list[int], group_size: int) -> list[float]:
    from mathruler.grader import extract_boxed_content, grade_answer

    answers = [extract_boxed_content(r) for r in responses]
    rewards = []
    for start in range(0, len(answers), group_size):
        group = answers[start : start + group_size]
        majority = Counter(group).most_common(1)[0][0]
        rewards.extend(1.0 if grade_answer(a, majority) else 0.0 for a in group)
    return rewards


def ours(responses: list[str], group_ids: list[int], matcher: AnswerMatcher) -> list[float]:
    return majority_vote(extract_answers(responses), group_ids, matcher=matcher).rewards


def verdict_agreement(responses: list[str], group_ids: list[int], matcher: AnswerMatcher,
                      reference: AnswerMatcher) -> float:
    """Fraction of distinct answer pairs within groups on which ``matcher`` and ``reference`` agree."""
    groups: dict[int, set[str]] = {}
    for answer, group in zip(extract_answers(responses), group_ids, strict=True):
        if answer is not None:
            groups.setdefault(group, set()).add(answer)
    pairs = [(a, b) for answers in groups.values() for a in sorted(answers) for b in sorted(answers) if a < b]
    return sum(matcher.equal(a, b) == reference.equal(a, b) for a, b in pairs) / max(1, len(pairs))


def print_table(batch: str, num_responses: int, group_size: int, seed: int, workers: int, reference: bool) -> None:
    responses, group_ids, truth = make_data(num_responses, group_size, seed, BATCHES[batch])
    # warm up on other data (imports, sympy caches) so that we time steady-state grading with cold answer caches
    warm, warm_ids, _ = make_data(50, group_size, seed + 10_000, BATCHES[batch])
    baseline(warm, warm_ids, group_size)
    ours(warm, warm_ids, AnswerMatcher())
    methods: list[tuple[str, AnswerMatcher | None]] = [("baseline: Counter + mathruler", None)]
    if reference:
        methods.append(("math-verify path (no fast path)", AnswerMatcher(exact_fast_path=False)))
    methods.append(("ours: exact fast path, in-process", AnswerMatcher(num_workers=0)))
    if workers >= 2:
        pooled = AnswerMatcher(num_workers=workers)
        pooled.start_workers()
        methods.append((f"ours: exact fast path, {workers} workers", pooled))
    rows = []
    for name, matcher in methods:
        start = time.perf_counter()
        rewards = baseline(responses, group_ids, group_size) if matcher is None else ours(responses, group_ids, matcher)
        seconds = time.perf_counter() - start
        rows.append((name, matcher, len(responses) / seconds, agreement(rewards, truth), seconds))
    reference_matcher = rows[1][1] if reference else None
    print(f"batch {batch} ({', '.join(BATCHES[batch])}): {len(responses)} responses in groups of {group_size}, "
          f"seed {seed}\n")
    print("| method | responses/s | agreement with truth | verdicts = math-verify path | math-verify calls | seconds "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, matcher, rate, agree, seconds in rows:
        verdicts = calls = "-"
        if matcher is not None:
            calls = f"{matcher.num_symbolic_calls:,}"
            if reference_matcher is not None:
                verdicts = f"{verdict_agreement(responses, group_ids, matcher, reference_matcher):.4f}"
        print(f"| {name} | {rate:,.0f} | {agree:.4f} | {verdicts} | {calls} | {seconds:.2f} | {rate / rows[0][2]:.1f}x |")
        if matcher is not None:
            matcher.close()
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=10_000)
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expression-responses", type=int, default=2_000,
                        help="size of the expressions batches (every distinct pair there costs math-verify calls)")
    parser.add_argument("--batches", nargs="+", choices=sorted(BATCHES), default=list(BATCHES))
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the pooled row (< 2: no row)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow math-verify-path row")
    args = parser.parse_args()
    for batch in args.batches:
        size = args.responses if batch == "mixed" else args.expression_responses
        print_table(batch, size, args.group_size, args.seed, args.workers, not args.no_reference)


if __name__ == "__main__":
    main()
