import pytest
import torch

from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.engines.micro_batching import (MicroBatchLayout, batch_nbytes, image_order, image_rows, micro_batch_widths,
                                                   plan_micro_batches, select_samples, sequence_lengths)
from mmupt_megatron.trainer.batching import BatchTraffic, pack_rollouts, shard_for_rank

IMG = 9


def rollout(prompt_index, prompt, response):
    return Rollout(
        group_id=prompt_index, prompt_index=prompt_index, sample_index=0, prompt_token_ids=prompt,
        response_token_ids=response, response_logprobs=[-1.0] * len(response), text="", finish_reason="stop",
    )


def images_of(prompt_index, num_patches):
    return torch.full((num_patches, 4), float(prompt_index)), torch.tensor([[1, 2, num_patches // 2]])


def test_pack_aligns_loss_mask_with_next_token_logprobs():
    rollouts = [rollout(0, [1, IMG, IMG, 2], [5, 6, 7]), rollout(1, [1, 3], [8])]
    batch = pack_rollouts(rollouts, pad_id=0, advantages_B=torch.tensor([1.0, -1.0]))
    assert batch.input_ids_BT.tolist() == [[1, IMG, IMG, 2, 5, 6, 7], [1, 3, 8, 0, 0, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    # mask[b, t] = 1 iff token t+1 is a response token
    assert batch.loss_mask_BT.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    targets = batch.input_ids_BT[:, 1:][batch.loss_mask_BT.bool()]
    assert targets.tolist() == [5, 6, 7, 8]


def test_images_travel_once_per_prompt_through_packing_and_sharding():
    rollouts = [rollout(0, [1, IMG, IMG], [5]), rollout(0, [1, IMG, IMG], [6]), rollout(1, [1, 2], [7]),
                rollout(2, [IMG, IMG, 2], [8])]
    images = {0: images_of(0, 8), 2: images_of(2, 8)}
    batch = pack_rollouts(rollouts, pad_id=0, images=images)
    assert batch.pixel_values.shape == (16, 4) and batch.image_grid_thw.shape == (2, 3)  # prompt 0's image once
    assert batch.image_index_B.tolist() == [0, 0, -1, 1]
    copies = pack_rollouts(rollouts, pad_id=0, images=images, images_once=False)  # the layout before
    assert copies.pixel_values.shape == (24, 4) and copies.image_index_B is None
    for packed in (batch, copies):
        first = shard_for_rank(packed, dp_rank=0, dp_size=2, image_token_id=IMG)
        second = shard_for_rank(packed, dp_rank=1, dp_size=2, image_token_id=IMG)
        assert first.input_ids_BT.shape[0] == second.input_ids_BT.shape[0] == 2
        assert first.image_index_B.tolist() == ([0, 0] if packed is batch else [0, 1])
        assert set(first.pixel_values[:, 0].tolist()) == {0.0}
        assert second.pixel_values.shape == (8, 4) and set(second.pixel_values[:, 0].tolist()) == {2.0}
        assert second.image_grid_thw.tolist() == [[1, 2, 4]] and second.image_index_B.tolist() == [-1, 0]
    assert shard_for_rank(batch, dp_rank=0, dp_size=2, image_token_id=IMG).pixel_values.shape == (8, 4)


def test_select_samples_reorders_cuts_and_keeps_only_used_images():
    rollouts = [rollout(0, [1, IMG, IMG], [5, 6, 7]), rollout(1, [IMG, IMG, 2], [8]), rollout(0, [1, IMG, IMG], [6]),
                rollout(2, [1, 2], [4])]
    batch = pack_rollouts(rollouts, pad_id=0, images={0: images_of(0, 8), 1: images_of(1, 8)},
                          advantages_B=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    batch.old_logprobs_BT = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 5)
    assert sequence_lengths(batch) == [6, 4, 4, 3]
    picked = select_samples(batch, [2, 3, 0], image_token_id=IMG, width=4)  # cut: sample 0 keeps 4 of 6 tokens
    assert picked.input_ids_BT.tolist() == [[1, IMG, IMG, 6], [1, 2, 4, 0], [1, IMG, IMG, 5]]
    assert picked.loss_mask_BT.shape == picked.old_logprobs_BT.shape == (3, 3)
    assert picked.old_logprobs_BT[2].tolist() == [0.0, 1.0, 2.0] and picked.advantages_B.tolist() == [3.0, 4.0, 1.0]
    assert picked.image_grid_thw.shape == (1, 3) and picked.image_index_B.tolist() == [0, -1, 0]
    assert set(picked.pixel_values[:, 0].tolist()) == {0.0}
    rows = image_rows(batch, IMG)
    assert rows == [[0], [1], [0], []] and image_order(rows, [2, 3, 0]).tolist() == [0, 0]  # one image, used twice
    assert image_order(rows, [1, 0]).tolist() == [1, 0] and image_order(rows, [3]) is None
    text_only = select_samples(batch, [3], image_token_id=IMG)
    assert text_only.pixel_values is None and text_only.image_index_B is None


def test_token_budget_plan_groups_by_length_under_the_budget():
    lengths = [10, 3, 7, 3, 9, 2]
    plan = plan_micro_batches(lengths, max_tokens=20, multiple=1)
    assert sorted(i for mb in plan for i in mb) == list(range(6))  # every sample exactly once
    widths = micro_batch_widths(lengths, plan, 1)
    assert all(len(mb) * w <= 20 for mb, w in zip(plan, widths))
    assert plan == [[0, 4], [2, 1], [3, 5]]  # longest first: the long ones together
    assert micro_batch_widths(lengths, plan_micro_batches(lengths, max_tokens=32, multiple=8), 8) == [16, 8]
    with pytest.raises(ValueError, match=r"trainer.max_tokens_per_micro_batch=9 is smaller than a sequence of 10 tokens"):
        plan_micro_batches(lengths, max_tokens=9)
    with pytest.raises(ValueError, match=r"of 9 tokens \(padded to a multiple of 8: 16\); raise it to at least 16"):
        plan_micro_batches([9], max_tokens=12, multiple=8)


def test_traffic_counts_bytes_and_padding():
    batch = pack_rollouts([rollout(0, [1, 2], [3] * 6), rollout(0, [1, 2], [3])], pad_id=0)
    fixed, budget = BatchTraffic(), BatchTraffic(layout=MicroBatchLayout(max_tokens=8))
    packed = BatchTraffic(layout=MicroBatchLayout(max_tokens=16, multiple=4, packed=True, sequence_multiple=2))
    for traffic in (fixed, budget, packed):
        traffic.record([batch], copies=[2])
    assert fixed.sent_bytes == budget.sent_bytes == 2 * batch_nbytes(batch) > 0
    assert fixed.pop()["batch/padding_waste_pct"] == pytest.approx(100 * (1 - 11 / 16))
    assert budget.pop()["batch/padding_waste_pct"] == 0.0  # 8 + 3 tokens in two micro-batches
    assert packed.pop()["batch/padding_waste_pct"] == pytest.approx(100 * (1 - 11 / 12))  # one row: 8 + 4 slots
    assert fixed.pop() == {"batch/bytes_to_policy": 0.0, "batch/padding_waste_pct": 0.0}


def test_bad_input():
    with pytest.raises(ValueError, match="no rollouts"):
        pack_rollouts([], pad_id=0)
    with pytest.raises(ValueError, match="advantages for 1 rollouts"):
        pack_rollouts([rollout(0, [1], [2])], pad_id=0, advantages_B=torch.zeros(2))
    batch = pack_rollouts([rollout(0, [1], [2])] * 3, pad_id=0)
    with pytest.raises(ValueError, match="do not split evenly"):
        shard_for_rank(batch, dp_rank=0, dp_size=2, image_token_id=IMG)


def test_padding_for_data_parallel_ranks_adds_zero_loss_copies_with_their_images():
    from mmupt_megatron.trainer.batching import pad_for_ranks, take_sequences

    rollouts = [rollout(1, [1, 2], [7]), rollout(0, [1, IMG, IMG], [5, 6]), rollout(2, [IMG, IMG, 2], [8])]
    batch = pack_rollouts(rollouts, pad_id=0, images={0: images_of(0, 8), 2: images_of(2, 8)},
                          advantages_B=torch.tensor([1.0, -1.0, 0.5]))
    assert pad_for_ranks(batch, 3, image_token_id=IMG) is batch  # divisible: unchanged
    padded = pad_for_ranks(batch, 2, image_token_id=IMG)
    assert padded.input_ids_BT.shape[0] == 4
    assert padded.input_ids_BT[3].tolist() == padded.input_ids_BT[2].tolist()
    assert padded.loss_mask_BT[3].sum() == 0 and padded.advantages_B.tolist() == [1.0, -1.0, 0.5, 0.0]
    assert padded.loss_mask_BT[:3].tolist() == batch.loss_mask_BT.tolist()
    second = shard_for_rank(padded, dp_rank=1, dp_size=2, image_token_id=IMG)
    # the copy shares its original's image (images travel once): one image, both samples point at it
    assert second.image_grid_thw.shape[0] == 1 and (second.pixel_values == 2.0).all()
    assert second.image_index_B.tolist() == [0, 0]
    middle = take_sequences(batch, 1, 3, image_token_id=IMG)
    assert middle.input_ids_BT.tolist() == batch.input_ids_BT[1:3].tolist() and middle.pixel_values.shape == (16, 4)
    with pytest.raises(ValueError, match=r"sequences \[2, 2\) are not a non-empty range of the batch's 3"):
        take_sequences(batch, 2, 2, image_token_id=IMG)
