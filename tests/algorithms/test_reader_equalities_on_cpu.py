"""Equalities a reader sees that split votes before (issue 28 part 3), and their near misses.

Named values (``k = 45`` / ``45``), several boxes against one box holding the list (in order, unless one
side is a set or a list of solutions ``x = 1, x = 2``), a decimal of >= 6 places against the fraction it
rounds. Each new equality is symmetric, holds with and without the fast
path, and is one that math-verify 0.9.0 itself allows in one direction (``mv_oracle.allowed_equal``): no
new false positive against it.
"""

import pytest

from mmupt_megatron.algorithms import AnswerMatcher, extract_answers, majority_vote
from tests.algorithms.mv_oracle import allowed_equal

EQUAL = [
    # a named value and the bare value
    ("k = 45", "45"), ("(p,q) = (3,2)", "(3,2)"), ("(p, q) = (3, 2)", "(3,2)"), ("AB = 1", "1"), (r"\overline{AB} = 1", "1"),
    ("f(x) = x^2", "x^2"), ("f(2) = 7", "7"), ("x_1 = 3", "3"), (r"\theta = \frac{\pi}{3}", r"\frac{\pi}{3}"),
    (r"\angle ABC = 30^\circ", "30"), ("y = 2x + 3", "2x + 3"), ("E = mc^2", "mc^2"), (r"x \in (0, 1)", "(0, 1)"),
    ("k = 45", "k=45.0"), ("AB = 1", r"\overline{AB} = 1"), ("(p,q) = (3,2)", "(p, q) = (3, 2)"),
    # several boxes against one box holding the list
    (r"\boxed{1}\boxed{2}", r"\boxed{1,2}"), (r"\boxed{1}, \boxed{2}", r"\boxed{\{1, 2\}}"), (r"$\boxed{2}$ and $\boxed{1}$", r"\boxed{\{1, 2\}}"),
    (r"\boxed{x=1} or \boxed{x=2}", r"\boxed{1, 2}"), (r"\boxed{x=2} or \boxed{x=1}", r"\boxed{1, 2}"),
    (r"\boxed{3}, \boxed{2}", r"\boxed{(p, q) = (3, 2)}"), (r"\boxed{3}\boxed{2}", r"\boxed{(3, 2)}"),
    # a decimal to >= 6 places and the fraction it rounds
    ("0.333333", r"\frac{1}{3}"), ("0.3333333", "1/3"), ("0.666667", r"\frac{2}{3}"), ("0.142857", r"\frac17"), ("-0.833333", r"-\frac{5}{6}"),
    ("2.333333", r"2\frac{1}{3}"), ("x = 0.285714", r"\frac{2}{7}"), ("0.33333333", r"\frac{1}{3}"),
]

NOT_EQUAL = [
    # a name is not a value (the hand-written near misses of test_equivalence, and their kin)
    ("x + y = 1", "1"), ("a + 3z = 0", "0"), ("7 = 11a+c", "11a+c"), ("2x = 4", "4"), ("x^2 = 4", "4"), ("e = 3", "3"),
    ("x = 2x - 3", "2x - 3"), ("xy = 6", "6"), ("x = 3", "y = 3"), ("AB = 1", "BC = 1"), ("k = 45", "46"), ("A = 1", "A"),
    ("f(x) = x^2", "x^3"), ("(p,q) = (3,2)", "(2,3)"), ("E = mc^2", "E = 0"), (r"x \in (0, 1)", "[0, 1]"),
    # lists: order against a tuple, length, items
    (r"\boxed{2}\boxed{3}", r"\boxed{(3, 2)}"), (r"\boxed{2}\boxed{3}", r"\boxed{3, 2}"), ("10, 4, -2", "4, 10, -2"),
    (r"\boxed{1}\boxed{2}", r"\boxed{1, 2, 3}"), (r"\boxed{1}\boxed{2}", r"\boxed{1, 3}"),
    (r"\boxed{1} then \boxed{2}", r"\boxed{1, 2}"), ("1, 2", "3"), (r"\boxed{x=1}\boxed{y=2}", r"\boxed{(x, y) = (2, 1)}"),
    # decimals: fewer than 6 places, or not the rounding
    ("0.333", r"\frac{1}{3}"), ("0.33333", r"\frac{1}{3}"), ("0.666666", r"\frac{2}{3}"), ("0.3333334", r"\frac{1}{3}"),
    ("0.000000", r"\frac{1}{3000000}"), ("0.0156251", r"\frac{1}{64}"), ("0.333333", "0.3333333"),
    ("0.4545455", r"\frac{5}{11}"),  # 5/11 to 7 places, but 0.454546 and 0.454545 at 6: math-verify's places
]


def _answer(text: str) -> str:
    """A response's extracted answer (several boxes become one list); a bare answer stays itself."""
    return extract_answers([text])[0] if r"\boxed" in text else text


@pytest.mark.parametrize(("a", "b"), EQUAL)
@pytest.mark.parametrize("fast", [True, False])
def test_reader_equalities(a, b, fast):
    matcher = AnswerMatcher(exact_fast_path=fast)
    x, y = _answer(a), _answer(b)
    assert matcher.equal(x, y) and matcher.equal(y, x)


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_no_new_false_positive_against_math_verify(a, b):
    x, y = _answer(a), _answer(b)
    assert allowed_equal(x, y), f"{x!r} == {y!r} is not an equality math-verify (or a documented difference) allows"


@pytest.mark.parametrize(("a", "b"), NOT_EQUAL)
def test_near_misses_stay_apart(a, b):
    matcher = AnswerMatcher()
    x, y = _answer(a), _answer(b)
    assert not matcher.equal(x, y) and not matcher.equal(y, x)


def test_named_values_vote_together():
    answers = ["k = 45", "45", "45^\\circ", "k=45", "44", "44"]
    result = majority_vote(answers, [0] * 6, matcher=AnswerMatcher())
    assert result.rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0] and result.groups[0].num_distinct == 2


def test_boxes_vote_with_the_list():
    responses = [r"so \boxed{1}, \boxed{2}.", r"\boxed{1, 2}", r"$\boxed{x=2}$ or $\boxed{x=1}$", r"\boxed{3}", r"\boxed{1}"]
    result = majority_vote(extract_answers(responses), [0] * 5, matcher=AnswerMatcher())
    assert result.rewards == [1.0, 1.0, 1.0, 0.0, 0.0] and result.groups[0].majority_share == pytest.approx(0.6)


def test_named_values_with_use_math_verify_off_compare_canonical_values():
    matcher = AnswerMatcher(use_math_verify=False)
    assert matcher.equal("AB = 1", "1") and matcher.equal("x = \\sqrt{2}", "\\sqrt{2}")
    assert not matcher.equal("x = \\sqrt{2}", "2^{1/2}")  # canonical forms only: the texts differ
