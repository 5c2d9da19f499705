"""Micro-batches by token budget and images once per prompt change no log-prob, loss or update (fp32): the same
rollout batch through the fixed path (micro_batch_size, one image copy per sample, every sequence at the batch's
width) and the new one (sorted by length, grouped under a token budget, each micro-batch at its own width, each
prompt's image once), under DP=2 (the global-token normalisation across ranks) and PP=2 (micro-batches of
different shapes between stages); and packed (each micro-batch's sequences end to end in one row, Megatron's thd
path)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from mmupt_megatron.engines.rollout import Rollout
from tests.models.tiny_inputs import image_prompt_batch
from tests.tiny_models import make_tiny_qwen2_5_vl

LAYOUTS = ((1, 1, 2), (1, 2, 1))
RESPONSE_LENGTHS = (9, 2, 5, 7, 3, 8, 1, 4)
PROMPTS = (0, 1, 0, 2, 1, 0, 3, 2)  # prompt index of each sample: 0 and 1 have images, 2 and 3 are text


def make_rollouts(hf_dir, tmp_path) -> dict:
    ids_a, pix_a, grid_a = image_prompt_batch(hf_dir, tmp_path / "a.png")
    ids_b, pix_b, grid_b = image_prompt_batch(hf_dir, tmp_path / "b.png", question="How many circles?", seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [ids_a[0].tolist(), ids_b[0].tolist(), torch.randint(10, 300, (6,), generator=gen).tolist(),
               torch.randint(10, 300, (11,), generator=gen).tolist()]
    rollouts = [
        Rollout(group_id=p, prompt_index=p, sample_index=i, prompt_token_ids=prompts[p],
                response_token_ids=torch.randint(10, 300, (n,), generator=gen).tolist(), response_logprobs=[0.0] * n,
                text="", finish_reason="stop")
        for i, (p, n) in enumerate(zip(PROMPTS, RESPONSE_LENGTHS))
    ]
    return {"rollouts": rollouts, "images": {0: (pix_a, grid_a), 1: (pix_b, grid_b)},
            "advantages": torch.tensor([1.0, -0.5, 0.75, -0.25, 0.5, -1.0, 0.3, 0.2])}


def tiny_step_inputs(tmp_path):
    """(the tiny model's folder, ``make_rollouts``' data with old log-probs, the packed full batch)."""
    from mmupt_megatron.trainer.batching import pack_rollouts

    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=5)
    data = make_rollouts(hf_dir, tmp_path)
    full = pack_rollouts(data["rollouts"], pad_id=0, images=data["images"], advantages_B=data["advantages"])
    data["old"] = -3.0 + 0.1 * torch.randn(full.loss_mask_BT.shape, generator=torch.Generator().manual_seed(1))
    return hf_dir, data, full


def budget_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig, _micro_batches
    from mmupt_megatron.engines.micro_batching import batch_nbytes, sequence_lengths
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import iter_hf_files, load_hf_weights
    from mmupt_megatron.trainer.batching import pack_rollouts, shard_for_rank

    arch = load_arch(hf_dir)
    out = {}
    for tp, pp, dp in LAYOUTS:
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        for mode in ("fixed", "budget", "packed"):
            once = mode != "fixed"
            full = pack_rollouts(data["rollouts"], pad_id=0, images=data["images"], advantages_B=data["advantages"],
                                 images_once=once)
            budget = 2 * max(sequence_lengths(full)) + 3 if once else None
            batch = shard_for_rank(full, dp_rank=groups.dp_rank, dp_size=dp, image_token_id=arch.image_token_id)
            model = Qwen2_5_VLModel(arch, groups, init_weights=False)
            load_hf_weights(model, hf_dir)
            policy = MegatronPolicy(model, groups, PolicyOptimConfig(
                optimizer="sgd", lr=0.5, grad_clip=0.0, weight_decay=0.0, micro_batch_size=1,
                max_tokens_per_micro_batch=budget, sequence_packing=mode == "packed"))
            _, plan = _micro_batches(batch, policy.layout, image_token_id=arch.image_token_id)
            logprobs = policy.compute_logprobs(batch)
            batch.old_logprobs_BT = data["old"][groups.dp_rank * 8 // dp: (groups.dp_rank + 1) * 8 // dp]
            metrics = policy.train_step(batch)
            weights = {}
            for _, tensors in iter_hf_files(model):
                weights.update(tensors)
            out[(tp, pp, dp, mode)] = {"logprobs": logprobs, "loss": metrics.get("loss"), "weights": weights,
                                       "plan": plan, "bytes": batch_nbytes(batch), "dp_rank": groups.dp_rank}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_token_budget_and_shared_images_equal_the_fixed_path_under_dp_and_pp(tmp_path):
    from mmupt_megatron.engines.micro_batching import micro_batch_widths, sequence_lengths
    from mmupt_megatron.engines.sequence_packing import make_pack

    hf_dir, data, full = tiny_step_inputs(tmp_path)
    per_rank = run_workers(budget_worker, world_size=2, args=(str(hf_dir), data))

    valid = (full.attention_mask_BT[:, 1:] * full.attention_mask_BT[:, :-1]).bool()  # real tokens' log-probs

    def logprobs(key):
        parts = sorted((r[key]["dp_rank"], r[key]["logprobs"]) for r in per_rank if r[key]["logprobs"] is not None)
        return torch.cat([lp for _, lp in parts])

    def loss(key):  # DP ranks' losses add up to the batch's; PP: the last stage reports it
        return sum(r[key]["loss"] for r in per_rank if key[2] > 1 or r[key]["logprobs"] is not None)

    reference = logprobs((1, 2, 1, "fixed"))
    for layout, mode in itertools.product(LAYOUTS, ("budget", "packed")):
        fixed, budget = (*layout, "fixed"), (*layout, mode)
        assert logprobs(budget).shape == reference.shape == full.loss_mask_BT.shape
        torch.testing.assert_close(logprobs(budget)[valid], logprobs(fixed)[valid], rtol=0, atol=1e-6)
        torch.testing.assert_close(logprobs(budget)[valid], reference[valid], rtol=0, atol=1e-5)
        assert abs(loss(fixed)) > 1e-4 and loss(budget) == pytest.approx(loss(fixed), abs=1e-6)
        assert loss(budget) == pytest.approx(loss((1, 2, 1, "fixed")), abs=1e-6)
        for rank in per_rank:
            plan = rank[budget]["plan"]
            assert 1 < len(plan) < sum(map(len, plan))  # several micro-batches, several sequences in one
            if layout[2] == 1 and mode == "budget":  # the whole batch: micro-batches of their own widths
                assert len(set(micro_batch_widths(sequence_lengths(full), plan, 1))) > 1
            if mode == "packed":  # rows of different lengths (PP: shapes exchanged), each within the budget
                rows = [make_pack([sequence_lengths(full)[i] for i in mb]).total for mb in plan] if layout[2] == 1 else []
                assert not rows or (len(set(rows)) > 1 and max(rows) <= 2 * max(sequence_lengths(full)) + 3)
            assert rank[budget]["bytes"] <= rank[fixed]["bytes"]  # each prompt's image once (at most once here)
            for name, tensor in rank[fixed]["weights"].items():
                torch.testing.assert_close(rank[budget]["weights"][name], tensor, rtol=1e-5, atol=1e-6)
    # PP=2 has the whole batch on each stage: prompt 0's image once instead of three times
    assert sum(r[(1, 2, 1, "budget")]["bytes"] for r in per_rank) < sum(r[(1, 2, 1, "fixed")]["bytes"] for r in per_rank)


def test_a_budget_below_the_longest_sequence_is_refused_before_start():
    from mmupt_megatron.config import Config, ParallelConfig, RolloutConfig, TrainerConfig

    cfg = Config(rollout=RolloutConfig(max_prompt_length=96, max_new_tokens=40),
                 trainer=TrainerConfig(max_tokens_per_micro_batch=100))
    with pytest.raises(ValueError, match=r"trainer.max_tokens_per_micro_batch=100 is smaller than the longest possible "
                                         r"sequence: rollout.max_prompt_length \+ rollout.max_new_tokens = 96 \+ 40 = 136"):
        raise ValueError("; ".join(cfg.problems()))
    assert not [p for p in Config(trainer=TrainerConfig(max_tokens_per_micro_batch=8192)).problems()
                if "max_tokens" in p]
    # with sequence parallelism (and FP8) the longest sequence is padded first: the budget must hold that
    padded = Config(rollout=RolloutConfig(max_prompt_length=96, max_new_tokens=41),
                    trainer=TrainerConfig(max_tokens_per_micro_batch=137),
                    parallel=ParallelConfig(tensor_parallel_size=2, sequence_parallel=True))
    assert [p for p in padded.problems() if "max_tokens" in p] == [
        "trainer.max_tokens_per_micro_batch=137 is smaller than the longest possible sequence: rollout.max_prompt_length"
        " + rollout.max_new_tokens = 96 + 41 = 137, padded to a multiple of 2 (model.fp8 / parallel.sequence_parallel): 138"]
