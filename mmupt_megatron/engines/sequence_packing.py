"""Packed sequences (Megatron's ``thd`` layout): a micro-batch's sequences laid end to end in one row, no padding
between them beyond what the kernels need, each attending only to itself (``cu_seqlens``).

A ``Pack`` places sample k of a micro-batch at slot ``[offsets[k], offsets[k+1])`` of a row of ``total`` tokens: its
real tokens first (``lengths[k]``), then padding up to ``sequence_multiple`` (sequence parallelism splits every
sequence over the TP ranks); the last slot also absorbs the padding of the whole row up to ``pack_multiple`` (FP8's
16 x TP), so ``cu_seqlens`` (the slot bounds) ends at ``total``, the length of the row: Megatron's THD RoPE then reads
each token's own position (mrope: per token) rather than positions 0.. of each sequence. Padding tokens sit after
their slot's real tokens, so under the causal mask no real token sees them; their log-probs are never read.

Log-probs of a packed row (``logprobs[j] = log p(row[j+1] | row[:j+1])``) go back to the micro-batch's ``[B, T-1]``
layout with ``unpack_logprobs``: sample k's ``t``-th is the row's ``offsets[k] + t``, for t < lengths[k] - 1 (the
others, across a slot boundary, are never read). Pure tensor code, no Megatron (the model side is
``engines/megatron_policy.py``; the CPU stand-in for Transformer Engine's THD attention is
``models/packed_attention.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

BUDGET_KEY = "trainer.max_tokens_per_micro_batch"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Pack:
    lengths: tuple[int, ...]
    """Real tokens of each sample (right padding dropped)."""
    offsets: tuple[int, ...]
    """Where each sample's slot starts in the row; one more entry: ``total``."""

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def cu_seqlens(self) -> list[int]:
        """Slot bounds (padding counted): Megatron's ``cu_seqlens_q`` / ``cu_seqlens_q_padded``."""
        return list(self.offsets)

    @property
    def max_seqlen(self) -> int:
        return max(b - a for a, b in pairwise(self.offsets))


def _slot(length: int, sequence_multiple: int) -> int:
    """Tokens a sequence of ``length`` takes in a row (at least one)."""
    return round_up(max(length, 1), sequence_multiple)


def make_pack(lengths: Sequence[int], *, sequence_multiple: int = 1, pack_multiple: int = 1) -> Pack:
    if not lengths:
        raise ValueError("a pack needs at least one sequence")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + _slot(n, sequence_multiple))
    offsets[-1] = round_up(offsets[-1], pack_multiple)  # the last slot takes the row's padding
    return Pack(lengths=tuple(int(n) for n in lengths), offsets=tuple(offsets))


def plan_packs(lengths: Sequence[int], *, max_tokens: int, sequence_multiple: int = 1,
               pack_multiple: int = 1) -> list[list[int]]:
    """Sample indices per packed micro-batch, first fit by decreasing length: each row (slots rounded up to
    ``sequence_multiple``, the row to ``pack_multiple``) at most ``max_tokens`` long. A sequence that cannot fit
    alone is a ValueError naming the budget key and the numbers."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    used: list[int] = []  # slot tokens of each row so far (before the row's own rounding)
    for i in order:
        slot = _slot(lengths[i], sequence_multiple)
        alone = round_up(slot, pack_multiple)
        if alone > max_tokens:
            raise ValueError(f"{BUDGET_KEY}={max_tokens} is smaller than a sequence of {lengths[i]} tokens (packed: "
                             f"{alone} with its padding); raise it to at least {alone}")
        for k, tokens in enumerate(used):
            if round_up(tokens + slot, pack_multiple) <= max_tokens:
                plan[k].append(i)
                used[k] += slot
                break
        else:
            plan.append([i])
            used.append(slot)
    return plan


def _positions(pack: Pack, *, drop_last: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, position in the sample, position in the row) of every real token (``drop_last`` fewer per sample)."""
    samples, cols, dest = [], [], []
    for k, (n, start) in enumerate(zip(pack.lengths, pack.offsets)):
        count = max(n - drop_last, 0)
        samples.append(torch.full((count,), k, dtype=torch.long))
        cols.append(torch.arange(count))
        dest.append(torch.arange(start, start + count))
    return torch.cat(samples), torch.cat(cols), torch.cat(dest)


def pack_values(values_BT: torch.Tensor, pack: Pack, *, fill: float = 0) -> torch.Tensor:
    """``[..., B, T]`` -> ``[..., 1, total]``: each sample's real tokens at its slot, ``fill`` elsewhere."""
    if values_BT.shape[-2] != len(pack.lengths):
        raise ValueError(f"{values_BT.shape[-2]} samples for a pack of {len(pack.lengths)}")
    if max(pack.lengths) > values_BT.shape[-1]:
        raise ValueError(f"a sample of {max(pack.lengths)} tokens in a batch {values_BT.shape[-1]} wide")
    samples, cols, dest = (t.to(values_BT.device) for t in _positions(pack))
    out = values_BT.new_full((*values_BT.shape[:-2], 1, pack.total), fill)
    out[..., 0, dest] = values_BT[..., samples, cols]
    return out


def unpack_logprobs(packed_1J: torch.Tensor, pack: Pack, *, width: int) -> torch.Tensor:
    """A packed row's next-token log-probs ``[1, total - 1]`` -> ``[B, width - 1]`` (0 beyond each sample's own;
    differentiable)."""
    samples, cols, dest = (t.to(packed_1J.device) for t in _positions(pack, drop_last=1))
    out = packed_1J.new_zeros((len(pack.lengths), width - 1))
    return out.index_put((samples, cols), packed_1J[0, dest])


def check_right_padded(attention_mask_BT: torch.Tensor | None) -> None:
    """Packing keeps each sample's first ``length`` tokens: a sample whose attended tokens are not one prefix (left
    padding, holes) is a ValueError naming it."""
    if attention_mask_BT is None:
        return
    mask = attention_mask_BT.bool().cpu()
    ends = (mask * torch.arange(1, mask.shape[1] + 1)).amax(dim=1)
    bad = (mask.sum(dim=1) != ends).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"sequence packing needs right-padded samples (attention mask 1...1 0...0); samples {bad[:8]} "
                         f"have masked tokens before their last attended one")
