import pytest

from mmupt_megatron.algorithms import AnswerMatcher, canonical_form, majority_vote
from mmupt_megatron.algorithms.equivalence import DELIBERATE_DIFFERENCES
from tests.algorithms.mv_oracle import mv_equal


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("0.50", ".5"),
        (r"\dfrac{3}{4}", "3/4"),
        (r"\frac34", "0.75"),
        ("(B)", "B"),
        ("B.", r"\text{B}"),
        ("B)", "[B]"),
        (r"\text{(C)}", "C"),
        (r"45^\circ", "45"),
        (r"45^{\circ}", "45°"),
        (r"50\%", "50"),
        ("28 percent", "28"),
        ("28 pct", r"28\%"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("1{,}234", "1234"),
        ("1 234", "1234"),
        (r"1\,234", "1234"),
        ("4 4/9", "40/9"),
        (r"4\frac{4}{9}", r"\frac{40}{9}"),
        ("-4 4/9", r"-\frac{40}{9}"),
        ("2.0", "2"),
        (r"\left(1, 2\right)", "(1, 2)"),
        (r"$\frac{1}{2}$", "0.5"),
        ("x  +  1", "x + 1"),
    ],
)
def test_canonical_forms_agree(a, b):
    assert canonical_form(a) == canonical_form(b)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [("B", "choice"), ("(B)", "choice"), (r"\text{B}", "choice"), ("B.", "choice"), ("B)", "choice"),
     ("D = (0, 1)", "expr"), ("E = mc^2", "expr"), ("C + 1", "expr"), (r"A \cup B", "expr"), ("option B", "expr"),
     ("32, 349", "expr"), ("0,111", "expr"), ("1,22", "expr"), ("1,2345", "expr"), ("3e5", "expr"),
     ("x = 3", "number"), ("12.5 percent", "number"), (r"\frac{1}{2}\%", "expr"), ("4 5/4", "expr")],
)
def test_kinds(answer, kind):
    assert canonical_form(answer).kind == kind


# Near misses: the classes that a canonical-form layer gets wrong, and their neighbours. Never equal.
NEAR_MISSES = [
    ("D = (0, 1)", "D = (0, 1.5)"), ("E = mc^2", "E = 0"), ("C + 1", "C + 2"), (r"A \cup B", "A"),
    ("B + 1", "B"), ("A = 1", "A"), ("(C) 45", "C"), ("option B", "B"), ("b", "B"),
    ("a + 3z = 0", "0"), ("x + y = 1", "1"), ("7 = 11a+c", "11a+c"), ("2x = 4", "2"), ("x^2 = 4", "2"),
    ("x = 3", "y = 3"), ("e = 3", "3"), ("x > 3", "3"), (r"x \ge 3", "x > 3"),
    ("32, 349", "32349"), ("0,111", "111"), ("4 4/9", "44/9"), ("4 4/9", "16/9"), ("1,2", "12"),
    ("1,2", "1.2"), ("1,2345", "12345"), ("01,234", "1234"), ("1 234", "235"), ("3e5", "300000"),
    (r"12.5\%", "0.125"), (r"\frac{1}{2}\%", "0.5"), ("0.333", "1/3"), ("10^3", "103"), ("2^{10}", "210"),
    ("[0,1]", "(0,1)"), ("(0,1)", "(1,0)"), ("(0,1]", "(0,1)"), (r"\{1,2\}", r"\{1,2,3\}"),
    (r"\sqrt{2}", r"\sqrt{3}"), (r"2\sqrt{2}", r"\sqrt{2}"), (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}"),
    ("x+1", "x-1"), ("2x", "x^2"), (r"2\pi", r"\pi"), ("1", "2"), ("A", "B"), ("B", "2"), ("12", "1,2"),
]


@pytest.mark.parametrize(("a", "b"), NEAR_MISSES)
def test_near_misses_are_never_equal(a, b):
    matcher = AnswerMatcher()
    assert not matcher.equal(a, b)
    assert not matcher.equal(b, a)


def test_math_verify_is_asymmetric_on_equations_but_we_are_not():
    # math-verify reduces an equation to its right side only when it is the prediction
    assert mv_equal("a + 3z = 0", "0") and mv_equal("7 = 11a+c", "11a+c")
    matcher = AnswerMatcher()
    assert not matcher.equal("a + 3z = 0", "0") and not matcher.equal("0", "a + 3z = 0")
    assert matcher.equal("x = 3", "3") and matcher.equal(r"x = \sqrt{2}", r"2^{1/2}")
    assert matcher.equal("x + y = 1", "1 = x + y")  # two equations compare as equations


@pytest.mark.parametrize(
    ("a", "b"),
    [("28 percent", "28"), (r"0<f(x)<1", "(0,1)"), ("(0,1)", r"0<f(x)<1"), (r"\boxed{1}, \boxed{2}", r"\{1,2\}"),
     ("0,111", "0.111"), (r"x \in (0,1)", "(0, 1)"), (r"\text{10}", "10"), (r"\{1, 2\}", r"\{2,1\}"),
     (r"\sqrt{4}", "2"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), ("x+1", "1+x"), (r"2\pi", r"\pi \cdot 2")],
)
def test_equal_answers(a, b):
    matcher = AnswerMatcher()
    assert matcher.equal(a, b) and matcher.equal(b, a)


@pytest.mark.parametrize(
    ("a", "b", "canonical"),
    [("B.", "B", True), ("B)", "(B)", True), ("1 234", "1234", True), ("4 4/9", "40/9", True), ("12.5 percent", "12.5", True),
     ("12.5%", "12.5", True), (r"\overline{AB} = 3", "AB = 3", True), ("5 > x > 3", "3 < x < 5", False), (r"5 \ge x > 3", r"3 < x \le 5", False)],
)
def test_deliberate_differences_from_math_verify(a, b, canonical):
    """One example per documented difference: we say equal, math-verify 0.9.0 does not (in either order).
    The first seven are canonical forms (no math-verify needed); inequalities are read by ``exact_forms``."""
    assert len(DELIBERATE_DIFFERENCES) == 6
    assert AnswerMatcher(use_math_verify=not canonical).equal(a, b)
    assert not mv_equal(a, b)


@pytest.mark.parametrize(
    ("a", "b"), [(r"\sqrt{4}", "2"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), ("x+1", "1+x")]
)
def test_without_math_verify_only_the_fast_path(a, b):
    assert not AnswerMatcher(use_math_verify=False).equal(a, b)


def test_each_distinct_pair_is_compared_once():
    matcher = AnswerMatcher()
    for _ in range(5):
        matcher.cluster([r"\sin^2(x) + \cos^2(x)", "1", r"\sin^2(x) + \cos^2(x)", "3", "3.0"])
    first = matcher.num_symbolic_calls
    assert first > 0
    matcher.cluster(["1", r"\sin^2(x) + \cos^2(x)"])
    assert matcher.num_symbolic_calls == first


def test_numbers_and_letters_never_reach_math_verify():
    matcher = AnswerMatcher()
    matcher.cluster(["1", "2", "0.5", r"\frac{1}{2}", "A", "(B)", "C", "x = 3", "1 234", "28 pct"])
    assert matcher.num_symbolic_calls == 0


def test_a_timeout_is_counted_and_retried_without_a_limit():
    """A busy machine costs time, never a verdict: the call that ran past the limit is run again unbounded."""
    busy, idle = AnswerMatcher(timeout_s=1e-6), AnswerMatcher(timeout_s=0)
    pairs = [(r"\sin^2(x)+\cos^2(x)", "1"), (r"\sin(2x)", r"2\sin(x)\cos(x)"), (r"\log(8)", r"3\log(2)"), (r"\sin(x)", "x")]
    assert [busy.equal(a, b) for a, b in pairs] == [idle.equal(a, b) for a, b in pairs] == [True, True, True, False]
    assert busy.num_timeouts >= 1 and idle.num_timeouts == 0


def test_the_vote_reports_its_timeouts():
    answers = [r"\sin^2(x)+\cos^2(x)", "1", r"\tan(x)", "1"]
    busy = majority_vote(answers, [0] * 4, matcher=AnswerMatcher(timeout_s=1e-6))
    idle = majority_vote(answers, [0] * 4, matcher=AnswerMatcher(timeout_s=0))
    assert busy.rewards == idle.rewards == [1.0, 1.0, 0.0, 1.0]
    assert busy.equivalence_timeouts >= 1 and idle.equivalence_timeouts == 0


@pytest.mark.parametrize("text", ["10^{100000}", r"9^{9^{9}}", "2^3^4^5", "10000!", "x" * 1001])
def test_costly_answers_never_reach_sympy(text):
    matcher = AnswerMatcher()
    assert not matcher.equal(text, "7") and matcher.equal(text, text)
    assert matcher._parse(text) == [] and matcher.num_symbolic_calls == 0


def test_cluster_ids_follow_canonical_order():
    ids = AnswerMatcher().cluster(["2", "1", "1.0", "2.00"])
    assert ids == [1, 0, 0, 1]


def test_cluster_does_not_depend_on_order():
    answers = [r"\sqrt{2}", "x = 3", "3", r"2^{1/2}", "B", "(B)", "0<x<1", "(0,1)"]
    matcher = AnswerMatcher()
    ids = matcher.cluster(answers)
    reversed_ids = matcher.cluster(answers[::-1])[::-1]
    assert [ids.index(i) for i in ids] == [reversed_ids.index(i) for i in reversed_ids]
    assert ids[0] == ids[3] and ids[1] == ids[2] and ids[4] == ids[5] and ids[6] == ids[7]
