"""From rollouts to the policy's training batch.

A rollout is (prompt tokens, response tokens) as the engine tokenised them — image pads already expanded,
so the policy sees exactly the sequence the engine sampled. Sequences are right-padded; the loss mask
marks the response tokens (``loss_mask_BT[b, t] = 1`` when token t+1 is a response token, matching the
log-prob convention ``logprobs[b, t] = log p(ids[b, t+1] | ids[b, :t+1])``). Images travel once per prompt:
``pixel_values`` holds each prompt's image patches once and ``image_index_B`` points every sample at its prompt's
(``engines/micro_batching.py``); DP shards and mini-batches carry only the images their samples use.
``BatchTraffic`` counts what a step sends to the policy workers and the padding their forwards compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mmupt_megatron.engines.megatron_policy import PolicyBatch
from mmupt_megatron.engines.micro_batching import MicroBatchLayout, batch_nbytes, select_samples
from mmupt_megatron.engines.rollout import Rollout


def pack_rollouts(
    rollouts: Sequence[Rollout],
    *,
    pad_id: int,
    images: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    advantages_B: torch.Tensor | None = None,
    images_once: bool = True,
) -> PolicyBatch:
    """``images[prompt_index] = (pixel_values, image_grid_thw)`` of that prompt's image(s), if any. ``images_once``:
    each prompt's images once, shared by its samples (``image_index_B``); False: one copy per sample (the layout of
    the step-time benchmark's baseline)."""
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
    first_row: dict[int, int] = {}  # prompt index -> its first row in image_grid_thw
    index_B = torch.full((len(rollouts),), -1, dtype=torch.long)
    for b, rollout in enumerate(rollouts):
        prompt_len = len(rollout.prompt_token_ids)
        ids_BT[b, : lengths[b]] = torch.tensor(rollout.prompt_token_ids + rollout.response_token_ids)
        attention_BT[b, : lengths[b]] = 1
        loss_mask_BT[b, prompt_len - 1 : lengths[b] - 1] = 1.0
        if images is not None and rollout.prompt_index in images:
            if not images_once or rollout.prompt_index not in first_row:
                pixel_values, grid_thw = images[rollout.prompt_index]
                first_row[rollout.prompt_index] = sum(len(g) for g in grids)
                pixels.append(pixel_values)
                grids.append(grid_thw)
            index_B[b] = first_row[rollout.prompt_index]
    return PolicyBatch(
        input_ids_BT=ids_BT,
        attention_mask_BT=attention_BT,
        loss_mask_BT=loss_mask_BT,
        advantages_B=advantages_B,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        image_index_B=index_B if grids and images_once else None,
    )


def loss_normalisers(batch: PolicyBatch, scale: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """The loss's global (tokens, sequences) for ``batch``: its loss tokens and sequences times ``scale``
    (``algorithms.group_selection.filled_batch_scale``: dropped groups counted as trained)."""
    return float(batch.loss_mask_BT.sum()) * scale[0], batch.input_ids_BT.shape[0] * scale[1]


def engine_logprobs(rollouts: Sequence[Rollout], like_BT: torch.Tensor) -> torch.Tensor:
    """The engine's log-probs of the sampled tokens laid out like the policy's ``[B, T-1]`` log-probs."""
    out_BT = torch.zeros_like(like_BT)
    for b, rollout in enumerate(rollouts):
        start = len(rollout.prompt_token_ids) - 1
        out_BT[b, start : start + len(rollout.response_logprobs)] = torch.tensor(rollout.response_logprobs)
    return out_BT


def shard_for_rank(batch: PolicyBatch, *, dp_rank: int, dp_size: int, image_token_id: int | None) -> PolicyBatch:
    """The contiguous slice of samples data-parallel rank ``dp_rank`` trains on, with the images it uses."""
    num = batch.input_ids_BT.shape[0]
    if num % dp_size:
        raise ValueError(f"{num} sequences do not split evenly over {dp_size} data-parallel ranks")
    per = num // dp_size
    return select_samples(batch, range(dp_rank * per, (dp_rank + 1) * per), image_token_id=image_token_id)


@dataclass
class BatchTraffic:
    """What one step sends to the policy workers (tensor bytes, every call) and the tokens their forwards compute
    (once per DP shard and pass): ``pop`` returns the step's metrics and starts counting afresh."""

    layout: MicroBatchLayout = field(default_factory=MicroBatchLayout)
    """The policy's (``PolicyWorker.micro_batch_layout``): how its forwards cut and pad a shard."""
    sent_bytes: int = 0
    padded: int = 0
    real: int = 0

    def record(self, shards: Sequence[PolicyBatch], *, copies: Sequence[int]) -> None:
        """``shards[i]`` went to ``copies[i]`` workers (its DP rank's TP x PP ranks)."""
        for shard, count in zip(shards, copies, strict=True):
            self.sent_bytes += count * batch_nbytes(shard)
            padded, real = self.layout.padded_tokens(shard)
            self.padded, self.real = self.padded + padded, self.real + real

    def pop(self) -> dict[str, float]:
        out = {"batch/bytes_to_policy": float(self.sent_bytes),
               "batch/padding_waste_pct": 100.0 * (1 - self.real / self.padded) if self.padded else 0.0}
        self.sent_bytes = self.padded = self.real = 0
        return out


def take_sequences(batch: PolicyBatch, start: int, stop: int, *, image_token_id: int | None) -> PolicyBatch:
    """Sequences ``[start, stop)`` of a packed batch, with the images they use (the batch itself when that is all
    of it)."""
    num = batch.input_ids_BT.shape[0]
    if not 0 <= start < stop <= num:
        raise ValueError(f"sequences [{start}, {stop}) are not a non-empty range of the batch's {num}")
    if start == 0 and stop == num:
        return batch
    return select_samples(batch, range(start, stop), image_token_id=image_token_id)


def pad_for_ranks(batch: PolicyBatch, dp_size: int, *, image_token_id: int | None) -> PolicyBatch:
    """``batch`` with copies of its last sequence appended until ``dp_size`` divides the count; the copies have
    loss mask 0 and advantage 0, so they add nothing to the loss or its gradient (count the sequences and tokens of
    ``batch``, not of the result, for the loss's global normalisation); the same ``batch`` back when nothing is
    added. Drop their rows from per-sequence results (log-probs) with ``[:num]``."""
    num = batch.input_ids_BT.shape[0]
    extra = -num % dp_size
    if extra == 0:
        return batch
    padded = select_samples(batch, [*range(num), *[num - 1] * extra], image_token_id=image_token_id)
    for name in ("loss_mask_BT", "advantages_B"):  # select_samples copied them: the batch's own stay as they are
        value = getattr(padded, name)
        if value is not None:
            value[num:] = 0
    return padded
