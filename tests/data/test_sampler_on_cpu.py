"""The resumable sampler: deterministic, epoch-crossing, save/restore exact, shards disjoint."""

import pytest

from mmupt_megatron.data.sampler import ResumableSampler


def _run(sampler: ResumableSampler, num_batches: int, batch_size: int) -> list[list[int]]:
    return [sampler.next_batch(batch_size) for _ in range(num_batches)]


def test_each_epoch_is_a_seeded_permutation():
    a = _run(ResumableSampler(10, seed=3), 5, 4)  # 20 indices = 2 epochs
    flat = [i for batch in a for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new shuffle per epoch
    assert a == _run(ResumableSampler(10, seed=3), 5, 4)
    assert a != _run(ResumableSampler(10, seed=4), 5, 4)
    assert _run(ResumableSampler(5, seed=0, shuffle=False), 1, 7) == [[0, 1, 2, 3, 4, 0, 1]]


def test_save_and_restore_gives_the_same_continuation():
    full = _run(ResumableSampler(7, seed=1), 9, 3)
    first = ResumableSampler(7, seed=1)
    _run(first, 4, 3)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    resumed = ResumableSampler(7, seed=1)
    resumed.load_state_dict(state)
    assert _run(resumed, 5, 3) == full[4:]


def test_restore_refuses_a_different_dataset_or_seed():
    state = ResumableSampler(7, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(7, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid"):
        ResumableSampler(7, seed=1).load_state_dict(state | {"position": 7})


def test_shards_are_disjoint_and_cover_the_global_batch():
    global_batch = ResumableSampler(12, seed=5).next_batch(6)
    shards = []
    for rank in range(3):
        shards.append(ResumableSampler(12, seed=5).next_shard(6, rank=rank, world_size=3))
    assert sorted(i for s in shards for i in s) == sorted(global_batch)
    with pytest.raises(ValueError, match="dividing the batch, got rank 0, world_size 3, batch 5"):
        ResumableSampler(12, seed=5).next_shard(5, rank=0, world_size=3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        ResumableSampler(0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(3, seed=0).next_batch(0)
