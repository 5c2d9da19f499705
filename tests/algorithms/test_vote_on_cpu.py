import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmupt_megatron.algorithms import AnswerMatcher, label_rewards, majority_vote

ANSWERS = st.one_of(st.none(), st.sampled_from(["1", "1.0", "2", "0.5", r"\frac{1}{2}", "(B)", "B", "7"]))


def vote(answers, group_ids, **kwargs):
    return majority_vote(answers, group_ids, matcher=AnswerMatcher(use_math_verify=False), **kwargs)


def test_majority_by_equivalence_not_spelling():
    result = vote(["0.5", r"\frac{1}{2}", "1/2", "3", "3"], [0] * 5)
    assert result.rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
    group = result.groups[0]
    assert group.num_distinct == 2 and group.majority_share == pytest.approx(0.6)


def test_no_answer_never_votes_nor_earns():
    result = vote([None, None, None, "2", "3", "3"], [0] * 6)
    assert result.rewards == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert result.groups[0].num_no_answer == 3
    assert result.groups[0].majority_share == pytest.approx(2 / 6)


def test_all_no_answer_group_earns_nothing():
    result = vote([None, None], ["q", "q"])
    assert result.rewards == [0.0, 0.0] and result.groups["q"].pseudo_label is None


def test_tie_rule_is_order_independent():
    a = vote(["2", "1", "2", "1"], [0] * 4)
    b = vote(["1", "2", "1", "2"], [0] * 4)
    assert a.groups[0].pseudo_label == b.groups[0].pseudo_label == "1"
    assert a.rewards == [0.0, 1.0, 0.0, 1.0]


def test_groups_need_not_be_contiguous():
    result = vote(["1", "5", "1", "5", "2", "5"], ["a", "b", "a", "b", "a", "b"])
    assert result.rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert result.groups["b"].majority_share == 1.0 and result.groups["b"].entropy == 0.0


def test_min_agreement_zeroes_and_flags_the_group():
    result = vote(["1", "1", "2", "3", "4"], [0] * 5, min_agreement=0.5)
    assert result.rewards == [0.0] * 5 and result.groups[0].low_agreement
    kept = vote(["1", "1", "1", "3", "4"], [0] * 5, min_agreement=0.5)
    assert kept.rewards == [1.0, 1.0, 1.0, 0.0, 0.0] and not kept.groups[0].low_agreement


def test_soft_reward_is_the_answer_share():
    result = vote(["1", "1", "2", None], [0] * 4, soft=True)
    assert result.rewards == [0.5, 0.5, 0.25, 0.0]


def test_labels_only_fill_diagnostics():
    answers, groups = ["1", "1", "2"], [0, 0, 0]
    without = vote(answers, groups)
    right = vote(answers, groups, labels={0: "1.0"})
    wrong = vote(answers, groups, labels={0: "2"})
    assert without.rewards == right.rewards == wrong.rewards
    assert without.groups[0].pseudo_label_correct is None
    assert right.groups[0].pseudo_label_correct is True and wrong.groups[0].pseudo_label_correct is False


def test_label_reward_is_the_supervised_reference():
    rewards = label_rewards(["2", "2.0", "3", None], [0, 0, 0, 0], labels={0: "2"}, matcher=AnswerMatcher())
    assert rewards == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="missing for groups"):
        label_rewards(["2"], [9], labels={0: "2"}, matcher=AnswerMatcher())


@pytest.mark.parametrize(
    ("answers", "groups", "error", "match"),
    [
        (["1", "2"], [0], ValueError, "2 answers but 1 group ids"),
        ([], [], ValueError, "no responses"),
        (["1", "2", "3"], [0, 0, 1], ValueError, "group 1 has a single response"),
        (["1", 2], [0, 0], TypeError, "answer 1 is int"),
    ],
)
def test_bad_input_is_named(answers, groups, error, match):
    with pytest.raises(error, match=match):
        vote(answers, groups)


@settings(max_examples=150, deadline=None)
@given(st.lists(ANSWERS, min_size=2, max_size=12), st.randoms(use_true_random=False))
def test_permuting_a_group_permutes_its_rewards(answers, rng):
    order = list(range(len(answers)))
    rng.shuffle(order)
    base = vote(answers, [0] * len(answers))
    shuffled = vote([answers[i] for i in order], [0] * len(answers))
    assert shuffled.rewards == [base.rewards[i] for i in order]
    assert shuffled.groups[0].pseudo_label == base.groups[0].pseudo_label


@settings(max_examples=150, deadline=None)
@given(st.lists(ANSWERS, min_size=2, max_size=12), st.integers(min_value=0, max_value=12))
def test_adding_a_no_answer_changes_nobody_elses_reward(answers, position):
    position = min(position, len(answers))
    base = vote(answers, [0] * len(answers))
    extended = answers[:position] + [None] + answers[position:]
    after = vote(extended, [0] * len(extended))
    assert after.rewards[position] == 0.0
    assert after.rewards[:position] + after.rewards[position + 1 :] == base.rewards


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(ANSWERS, st.integers(0, 3)), min_size=2, max_size=24))
def test_each_group_votes_independently(pairs):
    answers = [a for a, _ in pairs]
    groups = [g for _, g in pairs]
    sizes = {g: groups.count(g) for g in groups}
    if min(sizes.values()) < 2:
        return
    joint = vote(answers, groups)
    for g in sizes:
        idx = [i for i, x in enumerate(groups) if x == g]
        alone = vote([answers[i] for i in idx], [g] * len(idx))
        assert [joint.rewards[i] for i in idx] == alone.rewards
