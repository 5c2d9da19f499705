"""Selecting samples of a policy batch, with the images they use, and planning micro-batches by token budget.

Images once per prompt: a batch holds each distinct image once (``image_grid_thw`` one row per image,
``pixel_values`` their patches in row order) and ``image_index_B[b]`` is the row of sample b's first image (-1:
none); its images are that row and the next ones, one per run of ``<|image_pad|>`` in its tokens. Without
``image_index_B`` the images are in sample order, one copy per sample (also read).
``select_samples`` keeps only the images the chosen samples use, so DP shards and micro-batches carry no others.

Token budget: ``plan_micro_batches`` sorts sequences by length (longest first) and packs them into micro-batches
whose padded size (count x the micro-batch's longest, rounded up to the sequence multiple) stays within the budget;
each micro-batch is then cut to its own width, so padding is paid per micro-batch, not per batch.

``MicroBatchLayout`` is the one description of how a DP rank's sequences become forward micro-batches (fixed,
bucketed by a token budget, or packed end to end: ``engines/sequence_packing.py``), read by the policy and by the
driver's padding count.

Works on any dataclass with the ``PolicyBatch`` fields (``*_BT`` tensors are [B, T] or [B, T-1]); no Megatron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from mmupt_megatron.engines.sequence_packing import BUDGET_KEY, Pack, make_pack, plan_packs, round_up

IMAGE_FIELDS = ("pixel_values", "image_grid_thw", "image_index_B")


def sequence_lengths(batch: Any) -> list[int]:
    """Tokens each sample needs: up to and including its last attended position (right padding is dropped)."""
    ids = batch.input_ids_BT
    if batch.attention_mask_BT is None:
        return [ids.shape[1]] * ids.shape[0]
    positions = torch.arange(1, ids.shape[1] + 1)
    return (batch.attention_mask_BT.bool().cpu() * positions).amax(dim=1).tolist()


def image_rows(batch: Any, image_token_id: int | None) -> list[list[int]]:
    """Per sample, the rows of ``image_grid_thw`` holding its images, in the order of its image-pad runs."""
    num = batch.input_ids_BT.shape[0]
    if batch.pixel_values is None or batch.image_grid_thw is None:
        return [[] for _ in range(num)]
    if image_token_id is None:
        raise ValueError("the batch has images but no image token id was given to find them")
    is_image_BT = batch.input_ids_BT == image_token_id
    counts = (is_image_BT[:, 0].long() + (is_image_BT[:, 1:] & ~is_image_BT[:, :-1]).sum(dim=1)).tolist()  # pad runs
    if batch.image_index_B is None:  # sample order, one copy per sample
        starts = [sum(counts[:b]) for b in range(num)]
    else:
        starts = batch.image_index_B.tolist()
    rows = [list(range(start, start + count)) if count else [] for start, count in zip(starts, counts)]
    used = [r for rs in rows for r in rs]
    if used and (min(used) < 0 or max(used) >= batch.image_grid_thw.shape[0]):
        raise ValueError(f"samples refer to image rows {min(used)}..{max(used)} but the batch has "
                         f"{batch.image_grid_thw.shape[0]} images")
    return rows


def image_order(rows: list[list[int]], indices: Sequence[int]) -> torch.Tensor | None:
    """The image rows of ``select_samples(batch, indices)`` in the order of its samples' image-pad runs (a row
    repeats for every sample that uses it); None without images. ``rows``: ``image_rows(batch, ...)``."""
    new_row = {old: new for new, old in enumerate(sorted({r for i in indices for r in rows[i]}))}
    order = [new_row[r] for i in indices for r in rows[i]]
    return torch.tensor(order, dtype=torch.long) if order else None


def select_samples(batch: Any, indices: Sequence[int], *, image_token_id: int | None, width: int | None = None,
                   rows: list[list[int]] | None = None):
    """Samples ``indices`` of ``batch`` (in that order) with only the images they use, each once; with ``width``,
    the sequence dimension cut to ``width`` tokens (``[B, T-1]`` fields to ``width - 1``). ``rows``: the batch's
    ``image_rows`` when already known."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    full = batch.input_ids_BT.shape[1]
    out: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name in IMAGE_FIELDS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value[index]
            if width is not None and f.name.endswith("_BT"):
                value = value[:, : width - (full - value.shape[1])]
        out[f.name] = value
    rows = image_rows(batch, image_token_id) if rows is None else rows
    used = sorted({r for i in indices for r in rows[i]})
    if not used:
        return replace(batch, **out, pixel_values=None, image_grid_thw=None, image_index_B=None)
    patches = batch.image_grid_thw.prod(dim=-1).tolist()
    offsets = [0]
    for count in patches:
        offsets.append(offsets[-1] + int(count))
    new_row = {old: new for new, old in enumerate(used)}
    pixels = torch.cat([batch.pixel_values[offsets[r] : offsets[r + 1]] for r in used])
    first = [new_row[rows[i][0]] if rows[i] else -1 for i in indices]
    return replace(batch, **out, pixel_values=pixels, image_grid_thw=batch.image_grid_thw[used],
                   image_index_B=torch.tensor(first, dtype=torch.long))


def plan_micro_batches(lengths: Sequence[int], *, max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Sample indices per micro-batch: longest first, each micro-batch as many sequences as fit in ``max_tokens``
    counting padding (count x its longest, rounded up to ``multiple``). A sequence longer than the budget is a
    ValueError naming trainer.max_tokens_per_micro_batch and the numbers."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    width = 0
    for i in order:
        if plan and (len(plan[-1]) + 1) * width <= max_tokens:
            plan[-1].append(i)
            continue
        width = round_up(max(lengths[i], 1), multiple)
        if width > max_tokens:
            raise ValueError(
                f"{BUDGET_KEY}={max_tokens} is smaller than a sequence of {lengths[i]} tokens"
                + (f" (padded to a multiple of {multiple}: {width})" if width != lengths[i] else "")
                + f"; raise it to at least {width}")
        plan.append([i])
    return plan


def micro_batch_widths(lengths: Sequence[int], plan: Sequence[Sequence[int]], multiple: int) -> list[int]:
    return [round_up(max(max(lengths[i] for i in mb), 1), multiple) for mb in plan]


@dataclass(frozen=True)
class MicroBatchLayout:
    """How a DP rank's sequences become forward micro-batches. Fixed: ``micro_batch_size`` consecutive sequences at
    the batch's width. Bucketed (``max_tokens``): ``plan_micro_batches``, each at its own longest. Packed: each
    micro-batch's sequences end to end in one row (``make_pack``), by ``plan_packs`` under ``max_tokens`` or
    ``micro_batch_size`` consecutive ones without it."""

    micro_batch_size: int = 1
    max_tokens: int | None = None
    multiple: int = 1
    """Widths (bucketed, fixed) and packed rows are rounded up to this (FP8: 16 x TP; sequence parallelism: TP)."""
    packed: bool = False
    sequence_multiple: int = 1
    """Packed: each sequence's slot is rounded up to this (sequence parallelism: TP)."""

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        if self.packed and self.max_tokens is not None:
            return plan_packs(lengths, max_tokens=self.max_tokens, sequence_multiple=self.sequence_multiple,
                              pack_multiple=self.multiple)
        if self.max_tokens is not None:
            return plan_micro_batches(lengths, max_tokens=self.max_tokens, multiple=self.multiple)
        size = self.micro_batch_size
        return [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]

    def pack(self, lengths: Sequence[int]) -> Pack:
        """The row of a packed micro-batch whose samples have ``lengths`` (in micro-batch order)."""
        return make_pack(lengths, sequence_multiple=self.sequence_multiple, pack_multiple=self.multiple)

    def widths(self, lengths: Sequence[int], plan: Sequence[Sequence[int]], *, width: int) -> list[int]:
        """Each micro-batch's [B, T] width: its longest (rounded) with a budget or packing, else the batch's."""
        if self.max_tokens is None and not self.packed:
            return [width] * len(plan)
        return micro_batch_widths(lengths, plan, 1 if self.packed else self.multiple)

    def padded_tokens(self, batch: Any) -> tuple[int, int]:
        """(tokens the forward passes compute, real tokens) for ``batch`` on one DP rank."""
        lengths = sequence_lengths(batch)
        plan = self.plan(lengths)
        if self.packed:
            computed = sum(self.pack([lengths[i] for i in mb]).total for mb in plan)
        else:
            width = round_up(batch.input_ids_BT.shape[1], self.multiple)
            computed = sum(len(mb) * w for mb, w in zip(plan, self.widths(lengths, plan, width=width)))
        return computed, sum(lengths)


def batch_nbytes(batch: Any) -> int:
    """Bytes of the batch's tensors (what pickling it for another process carries, less a small header)."""
    return sum(v.nbytes for v in vars(batch).values() if isinstance(v, torch.Tensor))
