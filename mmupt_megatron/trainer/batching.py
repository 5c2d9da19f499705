"""From rollouts to the policy's training batch.

A rollout is (prompt tokens, response tokens) as the engine tokenised them — image pads already expanded,
so the policy sees exactly the sequence the engine sampled. Sequences are right-padded; the loss mask
marks the response tokens (``loss_mask_BT[b, t] = 1`` when token t+1 is a response token, matching the
log-prob convention ``logprobs[b, t] = log p(ids[b, t+1] | ids[b, :t+1])``). Images follow their samples:
``pixel_values`` concatenates each sample's image patches in sample order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmupt_megatron.engines.megatron_policy import PolicyBatch
from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.models.rope_index import image_runs


def pack_rollouts(
    rollouts: Sequence[Rollout],
    *,
    pad_id: int,
    images: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    advantages_B: torch.Tensor | None = None,
) -> PolicyBatch:
    """``images[prompt_index] = (pixel_values, image_grid_thw)`` of that prompt's image(s), if any."""
    if not rollouts:
        raise ValueError("no rollouts to pack")
    if advantages_B is not None and advantages_B.shape != (len(rollouts),):
        raise ValueError(f"{tuple(advantages_B.shape)} advantages for {len(rollouts)} rollouts")
    lengths = [len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts]
    width = max(lengths)
    ids_BT = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((len(rollouts), width), dtype=torch.long)
    loss_mask_BT = torch.zeros((len(rollouts), width - 1), dtype=torch.float32)
    pixels, grids = [], []
    for b, rollout in enumerate(rollouts):
        prompt_len = len(rollout.prompt_token_ids)
        ids_BT[b, : lengths[b]] = torch.tensor(rollout.prompt_token_ids + rollout.response_token_ids)
        attention_BT[b, : lengths[b]] = 1
        loss_mask_BT[b, prompt_len - 1 : lengths[b] - 1] = 1.0
        if images is not None and rollout.prompt_index in images:
            pixel_values, grid_thw = images[rollout.prompt_index]
            pixels.append(pixel_values)
            grids.append(grid_thw)
    return PolicyBatch(
        input_ids_BT=ids_BT,
        attention_mask_BT=attention_BT,
        loss_mask_BT=loss_mask_BT,
        advantages_B=advantages_B,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
    )


def engine_logprobs(rollouts: Sequence[Rollout], like_BT: torch.Tensor) -> torch.Tensor:
    """The engine's log-probs of the sampled tokens laid out like the policy's ``[B, T-1]`` log-probs."""
    out_BT = torch.zeros_like(like_BT)
    for b, rollout in enumerate(rollouts):
        start = len(rollout.prompt_token_ids) - 1
        out_BT[b, start : start + len(rollout.response_logprobs)] = torch.tensor(rollout.response_logprobs)
    return out_BT


def shard_for_rank(batch: PolicyBatch, *, dp_rank: int, dp_size: int, image_token_id: int | None) -> PolicyBatch:
    """The contiguous slice of samples data-parallel rank ``dp_rank`` trains on (images follow)."""
    num = batch.input_ids_BT.shape[0]
    if num % dp_size:
        raise ValueError(f"{num} sequences do not split evenly over {dp_size} data-parallel ranks")
    per = num // dp_size
    return take_sequences(batch, dp_rank * per, (dp_rank + 1) * per, image_token_id=image_token_id)


def take_sequences(batch: PolicyBatch, start: int, stop: int, *, image_token_id: int | None) -> PolicyBatch:
    """Sequences ``[start, stop)`` of a packed batch (images follow)."""
    num = batch.input_ids_BT.shape[0]
    if not 0 <= start < stop <= num:
        raise ValueError(f"sequences [{start}, {stop}) are not a non-empty range of the batch's {num}")
    fields = {
        name: (value[start:stop] if isinstance(value, torch.Tensor) else value)
        for name, value in vars(batch).items()
        if name not in ("pixel_values", "image_grid_thw")
    }
    if batch.pixel_values is None or image_token_id is None:
        return PolicyBatch(**fields)
    images_per_sample = [len(image_runs(batch.input_ids_BT[b] == image_token_id)) for b in range(num)]
    patches_per_image = (batch.image_grid_thw.prod(dim=-1)).tolist()
    image_start = sum(images_per_sample[:start])
    image_stop = image_start + sum(images_per_sample[start:stop])
    patch_start = sum(patches_per_image[:image_start])
    patch_stop = patch_start + sum(patches_per_image[image_start:image_stop])
    return PolicyBatch(
        **fields,
        pixel_values=batch.pixel_values[patch_start:patch_stop],
        image_grid_thw=batch.image_grid_thw[image_start:image_stop],
    )


def pad_for_ranks(batch: PolicyBatch, dp_size: int, *, image_token_id: int | None) -> PolicyBatch:
    """``batch`` with copies of its last sequence appended until ``dp_size`` divides the count; the copies have
    loss mask 0 and advantage 0, so they add nothing to the loss or its gradient (count the sequences and tokens of ``batch``,
    not of the result, for the loss's global normalisation); the same ``batch`` back when nothing is added. Drop their rows from per-sequence
    results (log-probs) with ``[:num]``."""
    num = batch.input_ids_BT.shape[0]
    extra = -num % dp_size
    if extra == 0:
        return batch
    last = take_sequences(batch, num - 1, num, image_token_id=image_token_id)
    fields = {}
    for name, value in vars(batch).items():
        if not isinstance(value, torch.Tensor):
            fields[name] = value
            continue
        tail = getattr(last, name)
        if tail is None:  # no image of its own
            fields[name] = value
            continue
        if name in ("loss_mask_BT", "advantages_B"):
            tail = torch.zeros_like(tail)
        fields[name] = torch.cat([value, *[tail] * extra])
    return PolicyBatch(**fields)

