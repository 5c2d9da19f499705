"""The placement pieces (``mapping.layer_pieces`` / ``vocab_piece``) describe exactly the layout of the
reference mappings (``hf_layer_to_megatron`` / ``megatron_layer_to_hf`` / ``split_vocab``): every element
once, in both directions, with contiguous Megatron views."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.models import mapping as M

HIDDEN, FFN = 16, 12


def random_layer(dims: M.AttentionDims, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = M.hf_layer_shapes(dims, hidden_size=HIDDEN, ffn_hidden_size=FFN)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


LAYOUTS = [(heads, kv, tp) for heads, kv in [(8, 4), (8, 2), (8, 8), (4, 1)] for tp in (1, 2, 4) if kv % tp == 0]


@pytest.mark.parametrize(("heads", "kv", "tp"), LAYOUTS)
@pytest.mark.parametrize("te_spec", [False, True])
def test_layer_pieces_reproduce_the_reference_mapping(heads, kv, tp, te_spec):
    dims = M.AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=6)
    layer = random_layer(dims, seed=heads * 10 + kv + tp)
    shards = M.hf_layer_to_megatron(layer, dims=dims, tp=tp, te_spec=te_spec)
    gathered = {name: torch.full_like(t, float("nan")) for name, t in layer.items()}
    covered = {name: torch.zeros_like(t) for name, t in layer.items()}
    for rank in range(tp):
        pieces = M.layer_pieces(dims, ffn_hidden_size=FFN, hidden_size=HIDDEN, tp=tp, tp_rank=rank, te_spec=te_spec)
        scattered = {key: torch.full_like(t, float("nan")) for key, t in shards[rank].items()}
        for piece in pieces:
            source = piece.meg_view(shards[rank][piece.meg_key])
            assert source.is_contiguous(), piece
            piece.meg_view(scattered[piece.meg_key]).copy_(piece.hf_view(layer[piece.hf_key]))  # HF -> Megatron
            if not piece.replicated or rank == 0:
                piece.hf_view(gathered[piece.hf_key]).copy_(source)  # Megatron -> HF
                piece.hf_view(covered[piece.hf_key]).add_(1)
        assert scattered.keys() == shards[rank].keys()
        assert all(torch.equal(scattered[key], shards[rank][key]) for key in scattered), rank
    assert all(torch.equal(gathered[name], layer[name]) for name in layer)
    assert all(bool((count == 1).all()) for count in covered.values())  # every element exactly once
    back = M.megatron_layer_to_hf(shards, dims=dims, te_spec=te_spec)
    assert all(torch.equal(back[name], gathered[name]) for name in layer)


@pytest.mark.parametrize(("vocab", "tp"), [(301, 1), (301, 2), (256, 4), (130, 4)])
def test_vocab_piece_matches_split_vocab(vocab, tp):
    padded = M.padded_vocab_size(vocab, tp=tp, multiple=128)
    weight = torch.randn(vocab, 3)
    shards = M.split_vocab(weight, tp=tp, padded_vocab=padded)
    covered = torch.zeros(vocab)
    for rank, shard in enumerate(shards):
        piece = M.vocab_piece("hf", "meg", vocab_size=vocab, padded_vocab=padded, tp=tp, tp_rank=rank)
        if piece is None:  # all padding
            assert torch.count_nonzero(shard) == 0
            continue
        assert torch.equal(piece.meg_view(shard), piece.hf_view(weight))
        assert torch.count_nonzero(shard[piece.size :]) == 0
        covered[piece.hf_start : piece.hf_start + piece.size] += 1
    assert bool((covered == 1).all())
