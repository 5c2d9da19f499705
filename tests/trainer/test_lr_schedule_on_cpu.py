"""The learning-rate schedule in the policy (``trainer.lr_schedule`` / ``warmup_steps`` / ``min_lr``): each optimizer
update takes its scheduled rate (``train/lr``) on every parameter group, and a resume from a checkpoint continues the
schedule where it stopped instead of warming up again."""

import pytest

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _policy(hf_dir):
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
    load_hf_weights(model, hf_dir)
    # linear: warm-up over 2 updates, then decay to 0 at update 4 of 4
    return MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, lr_schedule="linear", warmup_updates=2,
                                                           total_updates=4, min_lr=0.0, micro_batch_size=2))


def _step(policy, data):
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    metrics = policy.train_step(batch)
    return metrics["lr"], [group["lr"] for group in policy.optimizer.param_groups]


def schedule_worker(hf_dir, data, folder):
    from mmupt_megatron.models.convert import load_megatron_checkpoint, save_megatron_checkpoint
    from mmupt_megatron.trainer.optim_checkpoint import load_optimizer, save_optimizer

    policy = _policy(hf_dir)
    straight = [_step(policy, data) for _ in range(2)]
    save_megatron_checkpoint(policy.model, f"{folder}/policy", hf_meta_dir=hf_dir)
    save_optimizer(policy, f"{folder}/optimizer")
    straight += [_step(policy, data) for _ in range(2)]
    resumed = _policy(hf_dir)
    load_megatron_checkpoint(resumed.model, f"{folder}/policy")
    load_optimizer(resumed, f"{folder}/optimizer")
    return straight, resumed.updates, [_step(resumed, data) for _ in range(2)]


def test_each_update_takes_its_scheduled_rate_and_a_resume_continues_the_schedule(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    data = make_batch(hf_dir, tmp_path)
    [(straight, updates, resumed)] = run_workers(schedule_worker, world_size=1,
                                                 args=(str(hf_dir), data, str(tmp_path / "ckpt")), timeout_s=300)
    # warm-up 1e-2 x 1/2, 2/2; then linear decay over updates 2..4: 1e-2 x (1 - 0/2), (1 - 1/2)
    assert [lr for lr, _ in straight] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])
    assert all(groups == pytest.approx([lr] * len(groups)) for lr, groups in straight)  # every parameter group
    assert updates == 2  # the checkpoint knows where the schedule stood
    assert [lr for lr, _ in resumed] == pytest.approx([1e-2, 5e-3])  # not a second warm-up
