import pytest
import torch

from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.trainer.batching import pack_rollouts, shard_for_rank

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


def test_images_follow_samples_through_packing_and_sharding():
    rollouts = [rollout(0, [1, IMG, IMG], [5]), rollout(0, [1, IMG, IMG], [6]), rollout(1, [1, 2], [7]),
                rollout(2, [IMG, IMG, 2], [8])]
    images = {0: images_of(0, 8), 2: images_of(2, 8)}
    batch = pack_rollouts(rollouts, pad_id=0, images=images)
    assert batch.pixel_values.shape == (24, 4) and batch.image_grid_thw.shape == (3, 3)
    first = shard_for_rank(batch, dp_rank=0, dp_size=2, image_token_id=IMG)
    second = shard_for_rank(batch, dp_rank=1, dp_size=2, image_token_id=IMG)
    assert first.input_ids_BT.shape[0] == second.input_ids_BT.shape[0] == 2
    assert first.pixel_values.shape == (16, 4) and set(first.pixel_values[:, 0].tolist()) == {0.0}
    assert second.pixel_values.shape == (8, 4) and set(second.pixel_values[:, 0].tolist()) == {2.0}
    assert second.image_grid_thw.tolist() == [[1, 2, 4]]


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
    assert second.image_grid_thw.shape[0] == 2 and (second.pixel_values == 2.0).all()  # the copy has its image
    middle = take_sequences(batch, 1, 3, image_token_id=IMG)
    assert middle.input_ids_BT.tolist() == batch.input_ids_BT[1:3].tolist() and middle.pixel_values.shape == (16, 4)
    with pytest.raises(ValueError, match=r"sequences \[2, 2\) are not a non-empty range of the batch's 3"):
        take_sequences(batch, 2, 2, image_token_id=IMG)
