import pytest

from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.algorithms.metrics import pass_at_k, question_scores


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(10, 0, 1, 0.0), (10, 10, 5, 1.0), (10, 3, 1, 0.3), (4, 1, 2, 0.5), (5, 2, 2, 1 - 3 / 10), (5, 3, 3, 1.0)],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_question_scores():
    matcher = AnswerMatcher(use_math_verify=False)
    scores = question_scores(["2", "2.0", "3", None], "2", matcher=matcher)
    assert scores == {"pass@1": 0.5, "pass@4": 1.0, "maj@4": 1.0, "majority_share": 0.5}
    wrong = question_scores(["3", "3", "2", "4"], "2", matcher=matcher)
    assert wrong["maj@4"] == 0.0 and wrong["pass@1"] == 0.25 and wrong["pass@4"] == 1.0
