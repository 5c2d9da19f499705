"""parallel.overlap_grad_reduce / overlap_param_gather / grad_reduce_in_fp32 / distributed_optimizer reach Megatron's
DDP and optimizer: at DP=2 (gloo) two steps with the reductions overlapped leave the same weights as without; a
trainable vision tower with overlapped reductions is refused (a shard without images leaves its gradients missing,
and Megatron's bucket then asserts)."""

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def ddp_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    torch.set_num_threads(1)
    groups = init_parallel(ParallelDims(dp=2))
    rows = slice(groups.dp_rank * 2, groups.dp_rank * 2 + 2)
    batch = PolicyBatch(input_ids_BT=data["ids"][rows], attention_mask_BT=data["attention"][rows],
                        loss_mask_BT=data["loss_mask"][rows], advantages_B=data["advantages"][rows],
                        pixel_values=data["pixels"] if rows.start == 0 else None,
                        image_grid_thw=data["grid"] if rows.start == 0 else None)
    out = {}
    for name, options in {"plain": {}, "overlapped": {"overlap_grad_reduce": True, "overlap_param_gather": True},
                          "not distributed": {"distributed_optimizer": False}}.items():
        model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        # the vision tower frozen: rank 1's rows are text-only, and overlapped reductions need every trained
        # parameter to get a gradient on every rank (config: parallel.overlap_grad_reduce needs model.freeze_vision)
        policy = MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, micro_batch_size=1, freeze_vision=True,
                                                                 **options))
        for _ in range(2):
            policy.train_step(batch, global_num_tokens=int(data["loss_mask"].sum()), global_num_seqs=4)
        policy.ddp.start_param_sync(force_sync=True) if options.get("overlap_param_gather") else None
        out[name] = ([p.detach().clone() for p in model.parameters()],
                     policy.ddp.ddp_config.overlap_grad_reduce, policy.distributed_optimizer)
    return out


def test_overlapped_reductions_give_the_same_weights_and_the_keys_reach_megatron(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=3)
    for rank in run_workers(ddp_worker, world_size=2, args=(str(hf_dir), make_batch(hf_dir, tmp_path)), timeout_s=600):
        plain, overlapped, apart = rank["plain"], rank["overlapped"], rank["not distributed"]
        assert (plain[1:], overlapped[1:], apart[1:]) == ((False, True), (True, True), (False, False))
        assert max(float((a - b).abs().max()) for a, b in zip(plain[0], overlapped[0], strict=True)) < 1e-6
        # another optimizer (plain Adam, all-reduced gradients): the same update up to summation order
        assert max(float((a - b).abs().max()) for a, b in zip(plain[0], apart[0], strict=True)) < 1e-4


def test_overlapped_reductions_with_a_trainable_vision_tower_are_refused_naming_both_keys():
    from mmupt_megatron.config_loading import load_config

    with pytest.raises(ValueError, match=r"parallel.overlap_grad_reduce=true needs model.freeze_vision=true"):
        load_config("demo", ["parallel.overlap_grad_reduce=true", "model.freeze_vision=false"])
    with pytest.raises(ValueError, match=r"parallel.overlap_param_gather needs parallel.overlap_grad_reduce=true"):
        load_config("demo", ["parallel.overlap_param_gather=true", "model.freeze_vision=true"])
    assert load_config("demo", ["parallel.overlap_grad_reduce=true", "model.freeze_vision=true"]).parallel.overlap_grad_reduce
