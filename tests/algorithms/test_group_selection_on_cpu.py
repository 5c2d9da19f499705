"""Which groups a step trains on (algorithms.group_selection): zero-advantage groups dropped, oversampled
groups refilling the batch, whole-group mini-batches."""

import pytest

from mmupt_megatron.algorithms import group_advantages
from mmupt_megatron.algorithms.group_selection import filled_batch_scale, minibatch_bounds, select_groups


def rewards_of(groups: list[list[float]]) -> tuple[list[float], list[int]]:
    return [r for g in groups for r in g], [i for i, g in enumerate(groups) for _ in g]


def test_unanimous_and_all_equal_groups_are_dropped_and_order_is_kept():
    rewards, ids = rewards_of([[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]])
    advantages = group_advantages(rewards, ids).tolist()
    sel = select_groups(advantages, ids, target_groups=4)
    assert sel.kept_groups == (1, 3)
    assert sel.keep == (3, 4, 5, 9, 10, 11)
    assert (sel.sampled_groups, sel.zero_groups, sel.unfilled) == (4, 2, 2)
    assert sel.zero_share == pytest.approx(0.5)
    assert sel.filler == (0, 1, 2, 6, 7, 8)  # the dropped groups stand in for the two missing ones


def test_filler_is_the_first_dropped_groups_and_only_what_is_missing():
    rewards, ids = rewards_of([[1, 1], [0, 0], [1, 0], [1, 1]])
    sel = select_groups(group_advantages(rewards, ids).tolist(), ids, target_groups=2)
    assert sel.kept_groups == (2,) and sel.filler == (0, 1)  # one missing: group 0, not 1 or 3
    # the loss normaliser counts the filler as trained: tokens (3 + 4) of group 2 plus (5 + 6) of group 0
    assert filled_batch_scale(sel, [5, 6, 7, 8, 3, 4, 9, 9]) == (pytest.approx(18 / 7), 2.0)
    full = select_groups(group_advantages(rewards, ids).tolist(), ids, target_groups=1)
    assert full.filler == () and filled_batch_scale(full, [5, 6, 7, 8, 3, 4, 9, 9]) == (1.0, 1.0)


def test_without_dropping_the_first_target_groups_are_kept():
    rewards, ids = rewards_of([[1, 1], [1, 0], [0, 0]])
    sel = select_groups(group_advantages(rewards, ids).tolist(), ids, target_groups=3, drop_zero=False)
    assert sel.kept_groups == (0, 1, 2) and sel.keep == tuple(range(6))
    assert sel.zero_groups == 2 and sel.unfilled == 0  # counted even when not dropped
    assert sel.filler == ()


def test_oversampled_groups_refill_up_to_the_target_and_the_surplus_is_left_out():
    rewards, ids = rewards_of([[1, 1], [1, 0], [0, 0], [0, 1], [1, 0], [1, 0]])
    sel = select_groups(group_advantages(rewards, ids).tolist(), ids, target_groups=3)
    assert sel.kept_groups == (1, 3, 4)  # group 5 has signal too: beyond the target
    assert sel.unfilled == 0 and sel.sampled_groups == 6 and sel.filler == ()


def test_every_group_unanimous_keeps_nothing():
    rewards, ids = rewards_of([[1, 1], [0, 0]])
    sel = select_groups(group_advantages(rewards, ids).tolist(), ids, target_groups=2)
    assert sel.keep == () and sel.kept_groups == () and sel.unfilled == 2 and sel.zero_share == 1.0
    assert sel.filler == (0, 1, 2, 3)


def test_groups_need_not_be_contiguous_and_are_listed_group_by_group():
    sel = select_groups([0.5, 0.0, -0.5, 0.0], ["a", "b", "a", "b"], target_groups=2)
    assert sel.kept_groups == ("a",) and sel.keep == (0, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="3 advantages but 2 group ids"):
        select_groups([0.0, 1.0, 2.0], [0, 0], target_groups=1)
    with pytest.raises(ValueError, match="target_groups must be >= 1"):
        select_groups([], [], target_groups=0)
    with pytest.raises(ValueError, match="groups_per_update must be >= 1"):
        minibatch_bounds([0, 0], 0)


def test_minibatches_take_whole_groups_and_the_last_holds_the_rest():
    ids = [4, 4, 7, 7, 9, 9, 2, 2, 5, 5]
    assert minibatch_bounds(ids, 2) == [(0, 4), (4, 8), (8, 10)]
    assert minibatch_bounds(ids, 5) == [(0, 10)]
    assert minibatch_bounds(ids, 1) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert minibatch_bounds([], 3) == []
