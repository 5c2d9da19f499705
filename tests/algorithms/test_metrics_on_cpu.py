import pytest

from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.algorithms.metrics import pass_at_k, question_scores, score_question


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(10, 0, 1, 0.0), (10, 10, 5, 1.0), (10, 3, 1, 0.3), (4, 1, 2, 0.5), (5, 2, 2, 1 - 3 / 10), (5, 3, 3, 1.0)],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError, match=r"correct \(4\) <= samples \(3\)"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"k \(4\) <= samples"):
        pass_at_k(3, 1, 4)


def test_question_scores():
    matcher = AnswerMatcher(use_math_verify=False)
    scores = question_scores(["2", "2.0", "3", None], "2", matcher=matcher)
    assert scores == {"pass@1": 0.5, "pass@4": 1.0, "maj@4": 1.0, "majority_share": 0.5}
    wrong = question_scores(["3", "3", "2", "4"], "2", matcher=matcher)
    assert wrong["maj@4"] == 0.0 and wrong["pass@1"] == 0.25 and wrong["pass@4"] == 1.0


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (8, 3, 4, 1 - 5 / 70),  # 1 - C(5,4)/C(8,4)
        (6, 1, 3, 1 - 10 / 20),  # 1 - C(5,3)/C(6,3): a lone correct sample is in half the 3-subsets
        (8, 2, 1, 2 / 8),  # pass@1 is the fraction correct
        (3, 1, 3, 1.0),  # k = n: any correct sample
        (3, 0, 3, 0.0),
    ],
)
def test_pass_at_k_more_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_subset_average():
    """The estimator equals the exact fraction of k-subsets of the n samples holding a correct one."""
    from itertools import combinations

    correct = [True, False, False, True, False, False, False]
    for k in range(1, len(correct) + 1):
        subsets = list(combinations(correct, k))
        assert pass_at_k(len(correct), sum(correct), k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_maj_at_k_ties_go_to_the_smallest_canonical_form():
    matcher = AnswerMatcher(use_math_verify=False)
    # 2 vs 2: numbers "2" and "3" tie; "2" sorts first, so it is the majority
    assert score_question(["3", "2", "3", "2"], "2", matcher=matcher).majority_answer == "2"
    assert question_scores(["3", "2", "3", "2"], "2", matcher=matcher)["maj@4"] == 1.0
    assert question_scores(["3", "2", "3", "2"], "3", matcher=matcher)["maj@4"] == 0.0
    # letters tie the same way; the tie share is 2/4
    tie = question_scores(["B", "(A)", "B", "A."], "B", matcher=matcher)
    assert tie["maj@4"] == 0.0 and tie["majority_share"] == 0.5 and tie["pass@1"] == 0.5


def test_maj_at_k_missing_answers_never_vote_but_count_in_the_share():
    matcher = AnswerMatcher(use_math_verify=False)
    score = score_question([None, "7", None, None], "7", matcher=matcher)
    assert score.majority_answer == "7" and score.correct == [False, True, False, False]
    assert score.scores == {"pass@1": 0.25, "pass@4": 1.0, "maj@4": 1.0, "majority_share": 0.25}
    nobody = score_question([None, None], "7", matcher=matcher)
    assert nobody.majority_answer is None and nobody.scores["maj@2"] == 0.0 and nobody.scores["pass@2"] == 0.0


def test_maj_at_k_votes_over_the_first_k_of_n_samples():
    matcher = AnswerMatcher(use_math_verify=False)
    answers = ["1", "1", "2", "2", "2", "2"]
    score = score_question(answers, "1", matcher=matcher, k=3)
    # maj@3 over ["1", "1", "2"]; pass@3 from all 6 samples: 1 - C(4,3)/C(6,3) = 0.8; pass@1 = 2/6
    assert score.scores["maj@3"] == 1.0 and score.majority_answer == "1"
    assert score.scores["pass@3"] == pytest.approx(0.8) and score.scores["pass@1"] == pytest.approx(1 / 3)
    single = score_question(answers, "2", matcher=matcher, k=1)
    assert single.scores == {"pass@1": pytest.approx(4 / 6)} and single.majority_answer == "1"
