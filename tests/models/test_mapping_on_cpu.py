"""Pure HF <-> Megatron mapping: each transform and its inverse, without megatron."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from mmupt_megatron.models import mapping as M

DIMS = M.AttentionDims(num_heads=8, num_kv_heads=4, head_dim=6)
HIDDEN, FFN = 16, 12


def random_hf_layer(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q_rows, kv_rows = DIMS.num_heads * DIMS.head_dim, DIMS.num_kv_heads * DIMS.head_dim
    shapes = {
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (q_rows, HIDDEN), "self_attn.k_proj.weight": (kv_rows, HIDDEN),
        "self_attn.v_proj.weight": (kv_rows, HIDDEN), "self_attn.q_proj.bias": (q_rows,),
        "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.o_proj.weight": (HIDDEN, q_rows), "mlp.gate_proj.weight": (FFN, HIDDEN),
        "mlp.up_proj.weight": (FFN, HIDDEN), "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def test_qkv_interleave_layout_and_inverse():
    q = torch.arange(8 * 6).float()[:, None].expand(-1, 2)  # rows numbered per head
    k = 1000 + torch.arange(4 * 6).float()[:, None].expand(-1, 2)
    v = 2000 + torch.arange(4 * 6).float()[:, None].expand(-1, 2)
    qkv = M.interleave_qkv(q, k, v, DIMS)
    # Group 0 = q heads 0,1 (rows 0..11), then k head 0 (1000..1005), then v head 0 (2000..2005).
    assert qkv[:12, 0].tolist() == list(range(12))
    assert qkv[12:18, 0].tolist() == [1000.0 + i for i in range(6)]
    assert qkv[18:24, 0].tolist() == [2000.0 + i for i in range(6)]
    assert qkv[24, 0].item() == 12.0  # group 1 starts with q head 2
    for got, want in zip(M.split_qkv(qkv, DIMS), (q, k, v)):
        assert torch.equal(got, want)
    bias = M.interleave_qkv(q[:, 0], k[:, 0], v[:, 0], DIMS)
    assert torch.equal(bias, qkv[:, 0])


def test_tp_shard_of_qkv_holds_whole_groups():
    layer = random_hf_layer()
    shards = M.hf_layer_to_megatron(layer, dims=DIMS, tp=2)
    qkv1 = shards[1]["self_attention.linear_qkv.weight"]
    rank_dims = M.AttentionDims(4, 2, 6)
    q, k, v = M.split_qkv(qkv1, rank_dims)
    assert torch.equal(q, layer["self_attn.q_proj.weight"][24:])  # q heads 4..7
    assert torch.equal(k, layer["self_attn.k_proj.weight"][12:])  # kv heads 2..3
    assert torch.equal(v, layer["self_attn.v_proj.weight"][12:])


def test_fc1_per_rank_gate_up():
    gate, up = torch.randn(FFN, HIDDEN), torch.randn(FFN, HIDDEN)
    shards = M.split_fc1(gate, up, tp=2)
    assert torch.equal(shards[0], torch.cat([gate[:6], up[:6]]))
    assert torch.equal(shards[1], torch.cat([gate[6:], up[6:]]))
    merged = M.merge_fc1(shards)
    assert torch.equal(merged[0], gate) and torch.equal(merged[1], up)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("te_spec", [False, True])
def test_layer_round_trip_and_parallel_styles(tp, te_spec):
    layer = random_hf_layer(seed=tp)
    shards = M.hf_layer_to_megatron(layer, dims=DIMS, tp=tp, te_spec=te_spec)
    assert len(shards) == tp
    names = M.megatron_layer_names(te_spec=te_spec)
    assert shards[0][names["proj"]].shape == (HIDDEN, DIMS.num_heads * DIMS.head_dim // tp)  # row-parallel
    assert shards[0][names["fc2"]].shape == (HIDDEN, FFN // tp)
    assert shards[0][names["fc1"]].shape == (2 * FFN // tp, HIDDEN)  # column-parallel
    assert all(t.is_contiguous() for shard in shards for t in shard.values())
    back = M.megatron_layer_to_hf(shards, dims=DIMS, te_spec=te_spec)
    assert back.keys() == layer.keys()
    for name, tensor in layer.items():
        assert torch.equal(back[name], tensor), name


def test_split_merge_tp_inverse_and_contiguous():
    tensor = torch.randn(6, 8)
    for dim in (0, 1):
        parts = M.split_tp(tensor, tp=2, dim=dim)
        assert all(part.is_contiguous() for part in parts)
        assert torch.equal(M.merge_tp(parts, dim=dim), tensor)
    with pytest.raises(ValueError, match="dim 1 of size 8 into tp=3"):
        M.split_tp(tensor, tp=3, dim=1)


def test_vocab_padding_is_tp_independent_and_stripped():
    assert M.padded_vocab_size(301, tp=1) == M.padded_vocab_size(301, tp=2) == 384
    assert M.padded_vocab_size(256, tp=4) == 256
    assert M.padded_vocab_size(100, tp=3, multiple=4) == 108
    weight = torch.randn(301, 4)
    shards = M.split_vocab(weight, tp=2, padded_vocab=384)
    assert [s.shape[0] for s in shards] == [192, 192]
    assert torch.count_nonzero(shards[1][301 - 192 :]) == 0
    assert torch.equal(M.merge_vocab(shards, vocab_size=301), weight)
    with pytest.raises(ValueError, match="padded_vocab=300"):
        M.split_vocab(weight, tp=2, padded_vocab=300)


def test_names_and_missing_keys():
    assert M.normalize_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert M.normalize_hf_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert M.megatron_vision_to_hf(M.hf_vision_to_megatron("visual.merger.mlp.0.bias")) == "visual.merger.mlp.0.bias"
    layer = random_hf_layer()
    del layer["mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="mlp.up_proj.weight"):
        M.hf_layer_to_megatron(layer, dims=DIMS, tp=1)


def test_mapping_module_imports_no_megatron():
    tree = ast.parse(Path(M.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.startswith(("megatron", "torch.distributed")) for name in imported)
