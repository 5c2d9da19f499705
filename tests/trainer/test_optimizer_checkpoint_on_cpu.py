"""The optimizer's state survives a checkpoint: Adam moments and fp32 main params of Megatron's distributed
optimizer (DP=2) and of the plain one (DP=1) are saved as a dist-checkpoint and restored, so the next update
after a resume is the update the uninterrupted run makes. Without the optimizer state it is not; state of one
kind loaded into the other is a clear error."""

import pytest

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.engines.test_megatron_policy_on_cpu import make_batch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _policy(hf_dir, dp):
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims(tp=1, pp=1, dp=dp))
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
    load_hf_weights(model, hf_dir)
    return MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, weight_decay=0.1, adam_eps=1e-3, micro_batch_size=1))


def _step(policy, data, shift):
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    g = policy.groups
    rows = slice(g.dp_rank * 4 // g.dims.dp, (g.dp_rank + 1) * 4 // g.dims.dp)
    images = rows.start == 0
    batch = PolicyBatch(input_ids_BT=data["ids"][rows], attention_mask_BT=data["attention"][rows],
                        loss_mask_BT=data["loss_mask"][rows], advantages_B=data["advantages"][rows],
                        pixel_values=data["pixels"] if images else None, image_grid_thw=data["grid"] if images else None)
    batch.old_logprobs_BT = policy.compute_logprobs(batch) - shift
    return policy.train_step(batch)


def _weights(policy):
    from mmupt_megatron.models.weights import iter_hf_files

    out = {}
    for _, tensors in iter_hf_files(policy.model):
        out.update(tensors)
    return out


def straight_worker(hf_dir, data, folder):
    """Two updates at DP=2, checkpointing (policy + optimizer) after the first."""
    from mmupt_megatron.models.convert import save_megatron_checkpoint
    from mmupt_megatron.trainer.optim_checkpoint import save_optimizer

    policy = _policy(hf_dir, dp=2)
    _step(policy, data, 0.05)
    save_megatron_checkpoint(policy.model, f"{folder}/policy", hf_meta_dir=hf_dir)
    save_optimizer(policy, f"{folder}/optimizer")
    _step(policy, data, 0.02)
    return _weights(policy)


def resumed_worker(hf_dir, data, folder, dp, with_optimizer):
    from mmupt_megatron.models.convert import load_megatron_checkpoint
    from mmupt_megatron.trainer.optim_checkpoint import load_optimizer

    policy = _policy(hf_dir, dp=dp)
    load_megatron_checkpoint(policy.model, f"{folder}/policy")
    if with_optimizer:
        load_optimizer(policy, f"{folder}/optimizer")
    _step(policy, data, 0.02)
    return _weights(policy)


def dp1_worker(hf_dir, data, folder, dp2_folder):
    """DP=1 (the plain optimizer): straight vs save-and-resume, in one process; then the DP=2 state at DP=1."""
    from mmupt_megatron.models.convert import load_megatron_checkpoint, save_megatron_checkpoint
    from mmupt_megatron.trainer.optim_checkpoint import load_optimizer, save_optimizer

    policy = _policy(hf_dir, dp=1)
    _step(policy, data, 0.05)
    save_megatron_checkpoint(policy.model, f"{folder}/policy", hf_meta_dir=hf_dir)
    save_optimizer(policy, f"{folder}/optimizer")
    _step(policy, data, 0.02)
    straight = _weights(policy)
    resumed = _policy(hf_dir, dp=1)
    load_megatron_checkpoint(resumed.model, f"{folder}/policy")
    load_optimizer(resumed, f"{folder}/optimizer")
    _step(resumed, data, 0.02)
    try:
        load_optimizer(_policy(hf_dir, dp=1), f"{dp2_folder}/optimizer")
        mismatch = None
    except ValueError as error:
        mismatch = str(error)
    return {"diff": max_diff(_weights(resumed), straight), "mismatch": mismatch}


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_resumed_update_matches_the_uninterrupted_one(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=3)
    data = make_batch(hf_dir, tmp_path)
    folder = str(tmp_path / "ckpt")
    straight = run_workers(straight_worker, world_size=2, args=(str(hf_dir), data, folder))[0]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "optimizer").iterdir() if p.suffix == ".distcp")
    resumed = run_workers(resumed_worker, world_size=2, args=(str(hf_dir), data, folder, 2, True))[0]
    assert max_diff(resumed, straight) < 1e-6
    dp1 = run_workers(dp1_worker, world_size=1, args=(str(hf_dir), data, str(tmp_path / "dp1"), folder))[0]
    assert dp1["diff"] < 1e-6
    assert "optimizer state of a distributed adam optimizer (TP=1 PP=1 DP=2) does not load into a adam" in dp1["mismatch"]
    # the check has teeth: a fresh optimizer (what the old state_dict() restore amounted to) updates differently
    fresh = run_workers(resumed_worker, world_size=2, args=(str(hf_dir), data, folder, 2, False))[0]
    assert max_diff(fresh, straight) > 1e-4
