"""Packed (``thd``) attention for Megatron's local layer spec: what Transformer Engine's THD kernels do on GPU, in torch.

Megatron-Core runs packed sequences (``PackedSeqParams(qkv_format="thd")``) only through Transformer Engine's
attention; its local ``DotProductAttention`` refuses them. ``PackedDotProductAttention`` is the local one that
accepts them: the sequences of the row (``cu_seqlens_q_padded``, else ``cu_seqlens_q``) go through the local
attention side by side as a batch, each causal and blind to the others' tokens and to the batch's padding (one call
per layer; the linear layers still run on the row's tokens only). Everything around it (THD RoPE with
per-token mrope positions, the squeezed [t, heads, dim] shapes, the output reshape) is Megatron's own code, so the
CPU runs the same packed path as a GPU, with TE's fused kernel replaced. Without ``packed_seq_params`` it is the
local attention unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from mmupt_megatron.models.rope_index import causal_attention_mask


class PackedDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}; only 'thd' is supported")
        bounds = packed_seq_params.cu_seqlens_q_padded
        bounds = packed_seq_params.cu_seqlens_q if bounds is None else bounds
        bounds = tuple(bounds.tolist())
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the packed row has {query.shape[0]} tokens")
        cols_T, seqs_T, mask = _row_layout(bounds, query.device)
        width, num = mask.shape[-1], len(bounds) - 1

        def batched(x_THD: torch.Tensor) -> torch.Tensor:  # [t, heads, dim] -> [width, sequences, heads, dim]
            return x_THD.new_zeros((width, num, *x_THD.shape[1:])).index_put((cols_T, seqs_T), x_THD)

        out_TBH = super().forward(batched(query), batched(key), batched(value), mask, attn_mask_type, attention_bias)
        return out_TBH[cols_T, seqs_T][:, None]  # [t, 1, heads x dim], the row's order


@lru_cache(maxsize=8)
def _row_layout(bounds: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each token's position in its sequence, its sequence, the [sequences, 1, width, width] mask: causal within
    each sequence, the side-by-side padding masked) for a row with these bounds: built once per row, not per layer."""
    lengths = [end - start for start, end in pairwise(bounds)]
    cols_T = torch.cat([torch.arange(n) for n in lengths]).to(device)
    seqs_T = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(device)
    real_BT = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool, device=device)
    real_BT[seqs_T, cols_T] = True
    return cols_T, seqs_T, causal_attention_mask(max(lengths), real_BT, device=device)
