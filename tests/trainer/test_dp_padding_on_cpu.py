"""An odd number of trained sequences at DP=2 (what dropping zero-advantage groups leaves): the cluster pads the
batch with zero-loss copies (``pad_for_ranks``) and the data-parallel update equals the full-batch one (TP=2)."""

from __future__ import annotations

import json

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.tiny_models import make_tiny_qwen2_5_vl

ROWS = [2, 3, 0]
"""Two text-only sequences, then one with an image: the padding copy carries an image too."""


def step_worker(hf_dir: str, data: dict, image_token_id: int) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import iter_hf_files, load_hf_weights
    from mmupt_megatron.trainer.batching import pad_for_ranks, shard_for_rank

    full = PolicyBatch(input_ids_BT=data["ids"][ROWS], attention_mask_BT=data["attention"][ROWS],
                       loss_mask_BT=data["loss_mask"][ROWS], advantages_B=data["advantages"][ROWS],
                       pixel_values=data["pixels"][: len(data["pixels"]) // 2], image_grid_thw=data["grid"][:1])
    num_tokens, num_seqs = int(full.loss_mask_BT.sum()), full.input_ids_BT.shape[0]
    results = {}
    for tp, dp in ((2, 1), (1, 2)):
        groups = init_parallel(ParallelDims(tp=tp, pp=1, dp=dp))
        model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        policy = MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, optimizer="adam", grad_clip=1.0,
                                                                 weight_decay=0.0, adam_eps=1e-3, micro_batch_size=1))
        padded = pad_for_ranks(full, dp, image_token_id=image_token_id)
        batch = shard_for_rank(padded, dp_rank=groups.dp_rank, dp_size=dp, image_token_id=image_token_id)
        batch.old_logprobs_BT = policy.compute_logprobs(batch) - 0.05
        metrics = policy.train_step(batch, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
        weights = {}
        for _, tensors in iter_hf_files(model):
            weights.update(tensors)
        results[dp] = {"loss": metrics["loss"], "weights": weights, "rows": padded.input_ids_BT.shape[0],
                       "images": 0 if batch.image_grid_thw is None else batch.image_grid_thw.shape[0]}
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_odd_batch_at_dp2_is_padded_and_trains_like_the_full_batch(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    image_token_id = json.loads((hf_dir / "config.json").read_text())["image_token_id"]
    per_rank = run_workers(step_worker, world_size=2, args=(str(hf_dir), make_batch(hf_dir, tmp_path), image_token_id))

    assert [r[2]["rows"] for r in per_rank] == [4, 4]  # 3 sequences + 1 zero-loss copy
    assert [r[2]["images"] for r in per_rank] == [0, 1]  # rank 1: the image sequence and its copy share one image
    full_loss = per_rank[0][1]["loss"]
    assert abs(sum(r[2]["loss"] for r in per_rank) - full_loss) < 1e-6
    full, dp = {}, {}
    for r in per_rank:
        full.update(r[1]["weights"])
        dp.update(r[2]["weights"])
    assert set(full) == set(dp)
    for name, tensor in full.items():
        assert torch.allclose(dp[name], tensor, atol=2e-6, rtol=1e-5), name
