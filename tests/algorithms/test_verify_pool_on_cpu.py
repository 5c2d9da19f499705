"""``num_workers``: the math-verify stage in worker processes gives the same rewards as in-process."""

import pytest

from mmupt_megatron.algorithms import AnswerMatcher, majority_vote
from mmupt_megatron.algorithms.verify_pool import MAX_AUTO_WORKERS, free_cores

# groups whose votes need math-verify (trigonometry and logarithms are outside the exact fast path)
GROUPS = [[r"\sin^2(x)+\cos^2(x)", "1", r"\tan(x)", f"{k}", r"\log(8)", r"3\log(2)"] for k in range(1, 7)]
ANSWERS = [a for group in GROUPS for a in group]
IDS = [g for g, group in enumerate(GROUPS) for _ in group]


@pytest.mark.slow  # starting two spawned workers: ~10 s on 2 cores
def test_workers_give_the_in_process_rewards():
    alone = AnswerMatcher(num_workers=0)
    expected = majority_vote(ANSWERS, IDS, matcher=alone)
    with AnswerMatcher(num_workers=2) as pooled:
        assert pooled.start_workers() == 2
        result = majority_vote(ANSWERS, IDS, matcher=pooled)
        assert result.rewards == expected.rewards and result.equivalence_timeouts == 0
        assert pooled.num_symbolic_calls > 0 and pooled._parsed == {}  # math-verify ran in the workers only
        assert pooled._pool.lost == 0
        again = majority_vote(ANSWERS, IDS, matcher=pooled)  # the verdicts are cached in the parent now
        assert again.rewards == expected.rewards and pooled._parsed == {}
    assert pooled._pool is None  # closed


def test_no_workers_for_fast_batches_or_when_asked_for_none():
    matcher = AnswerMatcher(num_workers=2)
    majority_vote(["1", "1.0", r"\sqrt{2}", r"2^{1/2}"], [0, 0, 0, 0], matcher=matcher)
    assert matcher._pool is None  # nothing needed math-verify: no process started
    assert AnswerMatcher(num_workers=1).start_workers() == 0 and AnswerMatcher(num_workers=0).start_workers() == 0


def test_free_cores_is_bounded():
    assert 0 <= free_cores() <= MAX_AUTO_WORKERS


def test_bad_worker_count_is_named():
    with pytest.raises(ValueError, match="num_workers must be >= -1"):
        AnswerMatcher(num_workers=-2)


@pytest.mark.parametrize(("value", "ok"), [(-1, True), (0, True), (4, True), (-2, False), (1.5, False), (True, False)])
def test_reward_num_workers_is_validated(value, ok):
    from mmupt_megatron.config import RewardConfig

    problems = RewardConfig(num_workers=value).problems()
    assert problems == [] if ok else any("reward.num_workers must be an integer >= -1" in p for p in problems)
