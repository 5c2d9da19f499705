"""Megatron logits == transformers logits (fp32, 1e-5) at TP=2, PP=2 and TP=1 (x DP=2), for Qwen2.5-VL
with a real PNG image, Qwen2.5-VL text-only and text-only Qwen2 (GQA, tied embeddings, padded vocab)."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.tiny_models import make_tiny_qwen2, make_tiny_qwen2_5_vl
from tests.models.tiny_inputs import hf_logits, image_prompt_batch

LAYOUTS = ((2, 1, 1), (1, 2, 1), (1, 1, 2))  # (tp, pp, dp) on 2 workers


def megatron_logits(groups, model, ids, pixel_values=None, image_grid_thw=None):
    """Full logits on every rank of the last stage (None elsewhere)."""
    from mmupt_megatron.models.qwen2_5_vl import gather_logits
    from mmupt_megatron.models.rope_index import causal_attention_mask, mrope_position_ids

    arch = model.arch
    positions = mrope_position_ids(ids, image_token_id=arch.image_token_id, image_grid_thw=image_grid_thw)
    model.eval()
    with torch.no_grad():
        out = model(ids, positions, causal_attention_mask(ids.shape[1]), pixel_values, image_grid_thw)
        if not groups.is_last_stage:
            return None
        return gather_logits(out, groups, vocab_size=arch.vocab_size)


def pipeline_forward(groups, model, ids, pixel_values=None, image_grid_thw=None):
    """Forward across PP stages by hand: stage 0 sends hidden states to stage 1."""
    import torch.distributed as dist

    if groups.dims.pp == 1:
        return megatron_logits(groups, model, ids, pixel_values, image_grid_thw)
    from mmupt_megatron.models.rope_index import causal_attention_mask, mrope_position_ids

    arch = model.arch
    positions = mrope_position_ids(ids, image_token_id=arch.image_token_id, image_grid_thw=image_grid_thw)
    mask = causal_attention_mask(ids.shape[1])
    model.eval()
    with torch.no_grad():
        if groups.is_first_stage:
            hidden = model(ids, positions, mask, pixel_values, image_grid_thw)
            dist.send(hidden.contiguous(), dst=groups.pp_ranks[1])
            return None
        hidden = torch.empty(ids.shape[1], ids.shape[0], arch.hidden_size)
        dist.recv(hidden, src=groups.pp_ranks[0])
        model.set_input_tensor(hidden)  # later stages ignore pixel_values but need the grid for positions
        return megatron_logits(groups, model, ids, pixel_values, image_grid_thw)


def logits_worker(cases: list[tuple[str, tuple]]) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    results = {}
    for tp, pp, dp in LAYOUTS:
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        for hf_dir, inputs in cases:
            model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
            load_hf_weights(model, hf_dir)
            results[(tp, pp, dp, hf_dir, len(inputs), inputs[0].shape[0])] = pipeline_forward(groups, model, *inputs)
    return results


@pytest.mark.distributed
def test_megatron_logits_match_transformers(tmp_path):
    vl_dir = make_tiny_qwen2_5_vl(tmp_path / "vl", seed=1)
    text_dir = make_tiny_qwen2(tmp_path / "qwen2", seed=2)
    ids_img, pixels, grid = image_prompt_batch(vl_dir, tmp_path / "image.png")
    ids_text = torch.randint(10, 290, (2, 11), generator=torch.Generator().manual_seed(0))
    # a batch of two samples with different images: each sample must see its own image's features
    ids_b, pixels_b, grid_b = image_prompt_batch(vl_dir, tmp_path / "image_b.png", seed=5)
    two = (torch.cat([ids_img, ids_b]), torch.cat([pixels, pixels_b]), torch.cat([grid, grid_b]))
    cases = [(str(vl_dir), (ids_img, pixels, grid)), (str(vl_dir), (ids_text,)), (str(text_dir), (ids_text,)),
             (str(vl_dir), two)]
    references = {
        (hf_dir, len(inputs), inputs[0].shape[0]): hf_logits(hf_dir, *inputs) for hf_dir, inputs in cases
    }
    # the batched reference is the per-sample one (transformers places each image in its own sample)
    single_b = hf_logits(str(vl_dir), ids_b, pixels_b, grid_b)
    assert (references[(str(vl_dir), 3, 2)][1:] - single_b).abs().max() < 1e-5
    per_rank = run_workers(logits_worker, world_size=2, args=(cases,))
    checked = 0
    for tp, pp, dp in LAYOUTS:
        for hf_dir, inputs in cases:
            key = (hf_dir, len(inputs), inputs[0].shape[0])
            ref = references[key]
            for rank_results in per_rank:
                got = rank_results[(tp, pp, dp, *key)]
                if got is None:
                    continue
                assert got.shape == ref.shape
                err = (got - ref).abs().max().item()
                assert err < 1e-5, f"tp={tp} pp={pp} dp={dp} {hf_dir} inputs={len(inputs)}: max |diff| {err}"
                checked += 1
    assert checked == 2 * 4 + 1 * 4 + 2 * 4  # tp2 and dp2: both ranks; pp2: the last stage only
    # The image really changes the logits (the vision tower is wired in), and the two images differ.
    assert (references[(str(vl_dir), 3, 1)] - hf_logits(str(vl_dir), ids_img)).abs().max() > 1e-3
    assert (references[(str(vl_dir), 3, 2)][0] - single_b[0]).abs().max() > 1e-3
