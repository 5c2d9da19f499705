import pytest

from mmupt_megatron.algorithms import AnswerMatcher, canonical_form


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("0.50", ".5"),
        (r"\dfrac{3}{4}", "3/4"),
        (r"\frac34", "0.75"),
        ("(B)", "B"),
        ("B.", r"\text{B}"),
        ("option C", "(C) 45"),
        (r"45^\circ", "45"),
        (r"45^{\circ}", "45°"),
        (r"50\%", "50"),
        ("1,000", "1000"),
        ("2.0", "2"),
        ("x = 3", "3"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"$\frac{1}{2}$", "0.5"),
        (r"\text{10}", "10"),
    ],
)
def test_canonical_forms_agree(a, b):
    assert canonical_form(a) == canonical_form(b)


@pytest.mark.parametrize(("a", "b"), [("1", "2"), ("A", "B"), ("B", "2"), ("0.333", "1/3"), ("12", "1,2")])
def test_different_answers_differ(a, b):
    assert not AnswerMatcher().equal(a, b)


@pytest.mark.parametrize(
    ("a", "b"), [(r"\sqrt{4}", "2"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), ("x+1", "1+x"), (r"2\pi", r"\pi \cdot 2")]
)
def test_symbolic_equivalence_via_math_verify(a, b):
    matcher = AnswerMatcher()
    assert matcher.equal(a, b)
    assert not AnswerMatcher(use_math_verify=False).equal(a, b)


def test_each_distinct_pair_is_compared_once():
    matcher = AnswerMatcher()
    for _ in range(5):
        matcher.cluster([r"\sqrt{2}", r"2^{1/2}", r"\sqrt{2}", "3", "3.0"])
    first = matcher.num_symbolic_calls
    assert first > 0
    matcher.cluster([r"2^{1/2}", r"\sqrt{2}"])
    assert matcher.num_symbolic_calls == first


def test_numbers_and_letters_never_reach_math_verify():
    matcher = AnswerMatcher()
    matcher.cluster(["1", "2", "0.5", r"\frac{1}{2}", "A", "(B)", "C"])
    assert matcher.num_symbolic_calls == 0


def test_timeout_counts_as_not_equal():
    matcher = AnswerMatcher(timeout_s=1e-6)
    assert not matcher.equal(r"\sqrt{4}+x", "x+2")
    assert matcher.num_timeouts >= 1


def test_cluster_ids_follow_canonical_order():
    ids = AnswerMatcher().cluster(["2", "1", "1.0", "2.00"])
    assert ids == [1, 0, 0, 1]
