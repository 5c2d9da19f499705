"""Packed (``thd``) attention for Megatron's local layer spec: what Transformer Engine's THD kernels do on GPU, in torch.

Megatron-Core runs packed sequences (``PackedSeqParams(qkv_format="thd")``) only through Transformer Engine's
attention; its local ``DotProductAttention`` refuses them. ``PackedDotProductAttention`` is the local one that
accepts them: each sequence of the row (``cu_seqlens_q_padded``, else ``cu_seqlens_q``) goes through the local
attention on its own with a causal mask, so no token sees another sequence. Everything around it (THD RoPE with
per-token mrope positions, the squeezed [t, heads, dim] shapes, the output reshape) is Megatron's own code, so the
CPU runs the same packed path as a GPU, with TE's fused kernel replaced. Without ``packed_seq_params`` it is the
local attention unchanged.
"""

from __future__ import annotations

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
        bounds = bounds.tolist()
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the packed row has {query.shape[0]} tokens")
        outputs = []
        for start, end in pairwise(bounds):  # [t, heads, dim] -> one [s, 1, heads, dim] sequence
            mask = causal_attention_mask(end - start, device=query.device)
            outputs.append(super().forward(query[start:end, None], key[start:end, None], value[start:end, None],
                                           mask, attn_mask_type, attention_bias))
        return torch.cat(outputs, dim=0)  # [t, 1, heads x dim]
