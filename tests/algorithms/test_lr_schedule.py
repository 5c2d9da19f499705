"""The learning rate of each update (``algorithms/lr_schedule.py``), by hand."""

import math

import pytest

from mmupt_megatron.algorithms.lr_schedule import lr_at


def test_warmup_is_linear_from_the_first_update_then_constant():
    assert [lr_at(i, lr=1.0, warmup=4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, lr=3e-6) == 3e-6  # no warm-up: the full lr at once


def test_linear_and_cosine_decay_reach_min_lr_at_total_and_stay():
    # warm-up 2, total 6: updates 2..6 decay over 4 updates from 1.0 to 0.1
    assert [round(lr_at(i, lr=1.0, kind="linear", warmup=2, total=6, min_lr=0.1), 6) for i in range(8)] == \
           [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    cos = [lr_at(i, lr=1.0, kind="cosine", warmup=0, total=4, min_lr=0.0) for i in range(5)]
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match=r"schedule must be one of \('constant', 'linear', 'cosine'\), got 'step'"):
        lr_at(0, lr=1.0, kind="step")
