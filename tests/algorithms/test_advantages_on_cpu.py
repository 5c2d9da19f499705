import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmupt_megatron.algorithms import group_advantages


def test_grpo_matches_hand_computation():
    adv = group_advantages([1.0, 0.0, 1.0, 1.0], [0, 0, 0, 0])
    mean, std = 0.75, torch.tensor([1.0, 0.0, 1.0, 1.0]).std().item()
    assert adv.tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in [1.0, 0.0, 1.0, 1.0]], rel=1e-5)


def test_rloo_is_leave_one_out():
    adv = group_advantages([1.0, 0.0, 0.0], ["g"] * 3, estimator="rloo")
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_mean_and_unnormalised_grpo_agree():
    rewards, groups = [1.0, 0.0, 0.5, 2.0], [0, 1, 0, 1]
    assert torch.equal(
        group_advantages(rewards, groups, estimator="mean"),
        group_advantages(rewards, groups, normalize_std=False),
    )


def test_unanimous_and_singleton_groups_get_exact_zero():
    adv = group_advantages([0.1, 0.1, 0.1, 1.0, 1.0, 0.0, 0.5], [0, 0, 0, 1, 2, 2, 3])
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and adv[6].item() == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="algorithm.advantage"):
        group_advantages([1.0, 0.0], [0, 0], estimator="ppo")
    with pytest.raises(ValueError, match="3 rewards but 2 group ids"):
        group_advantages([1.0, 0.0, 1.0], [0, 0])
    with pytest.raises(ValueError, match="non-finite rewards at responses \\[1\\]"):
        group_advantages([1.0, float("nan")], [0, 0])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-5, 5, allow_nan=False), st.integers(0, 4)), min_size=1, max_size=40),
    st.sampled_from(["grpo", "rloo", "mean"]),
)
def test_advantages_sum_to_zero_per_group(pairs, estimator):
    rewards = [r for r, _ in pairs]
    groups = [g for _, g in pairs]
    adv = group_advantages(rewards, groups, estimator=estimator)
    for g in set(groups):
        total = sum(a for a, x in zip(adv.tolist(), groups) if x == g)
        assert abs(total) < 1e-3
