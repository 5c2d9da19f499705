"""The policy's log-probs at the sampling temperature, and the on-policy step: a world-1 Megatron policy at T=0.7
scores tokens as transformers' softmax(logits / 0.7); a step without old log-probs (on policy: the training
forward's own, detached) gives the same loss, metrics and updated weights as the two-pass step, in half the
forwards, with truncated importance sampling against engine log-probs on."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.models.tiny_inputs import hf_logits
from tests.tiny_models import make_tiny_qwen2_5_vl

TEMPERATURE = 0.7


def two_policies_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    cfg = PolicyOptimConfig(lr=1e-2, weight_decay=0.0, adam_eps=1e-3, micro_batch_size=2, temperature=TEMPERATURE,
                            rollout_is_cap=1.5)
    policies, forwards = [], []
    for _ in range(2):
        model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        policies.append(MegatronPolicy(model, groups, cfg))
        counter = [0]
        model.register_forward_pre_hook(lambda *_, c=counter: c.__setitem__(0, c[0] + 1))
        forwards.append(counter)

    def batch() -> PolicyBatch:
        return PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                           advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])

    two_pass, on_policy = policies
    old = two_pass.compute_logprobs(batch())
    # an engine that disagrees a little (other kernels): TIS weights around 1, some above the cap
    noise = 0.4 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    engine = (old + noise) * data["loss_mask"]
    untempered = two_pass.compute_logprobs(batch(), temperature=1.0)
    forwards[0][0] = 0
    two_pass_batch = batch()
    two_pass_batch.old_logprobs_BT, two_pass_batch.engine_logprobs_BT = two_pass.compute_logprobs(batch()), engine
    metrics_two = two_pass.train_step(two_pass_batch)
    on_policy_batch = batch()
    on_policy_batch.engine_logprobs_BT = engine
    metrics_one = on_policy.train_step(on_policy_batch)
    weights_diff = max(float((a - b).abs().max()) for a, b in zip(two_pass.model.parameters(),
                                                                  on_policy.model.parameters(), strict=True))
    moved = max(float((a - b).abs().max()) for a, b in zip(on_policy.model.parameters(), policies_at_start(hf_dir, groups)))
    return {"old": old, "untempered": untempered, "engine": engine, "two": metrics_two, "one": metrics_one,
            "forwards": (forwards[0][0], forwards[1][0]), "weights_diff": weights_diff, "moved": moved}


def policies_at_start(hf_dir: str, groups) -> list[torch.Tensor]:
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
    load_hf_weights(model, hf_dir)
    return list(model.parameters())


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("on_policy")
    hf_dir = make_tiny_qwen2_5_vl(tmp / "hf", seed=7)
    data = make_batch(hf_dir, tmp)
    (out,) = run_workers(two_policies_worker, world_size=1, args=(str(hf_dir), data))
    return hf_dir, data, out


@pytest.mark.distributed
def test_policy_logprobs_at_a_temperature_are_transformers_logits_over_it(stepped):
    hf_dir, data, out = stepped
    valid = data["attention"][0].bool()  # sample 0: a left-padded image prompt, against its unpadded tokens
    ids0, num_pad = data["ids"][0][valid][None], int((~valid).sum())
    logits = hf_logits(hf_dir, ids0, data["pixels"][: len(data["pixels"]) // 2], data["grid"][:1])[0, :-1]
    for temperature, ours in ((TEMPERATURE, out["old"]), (1.0, out["untempered"])):
        expected = (logits / temperature).log_softmax(-1).gather(1, ids0[0, 1:, None]).squeeze(1)
        assert (ours[0, num_pad:] - expected).abs().max() < 1e-5, temperature
    assert (out["old"] - out["untempered"]).abs().max() > 0.1


@pytest.mark.distributed
def test_the_on_policy_step_equals_the_two_pass_step_in_half_the_forwards(stepped):
    from mmupt_megatron.algorithms.loss import logprob_gap

    _, data, out = stepped
    two, one = out["two"], out["one"]
    print(f"\nforwards (two-pass, on-policy): {out['forwards']}; |loss diff| {abs(two['loss'] - one['loss']):.2e}, "
          f"max |weight diff| {out['weights_diff']:.2e}, update size {out['moved']:.2e}")
    # 4 sequences in micro-batches of 2: old pass + training pass = 4 forwards; on policy: the training pass only
    assert out["forwards"] == (4, 2)
    assert abs(two["loss"] - one["loss"]) < 1e-6 and abs(two["grad_norm"] - one["grad_norm"]) < 1e-6
    assert out["weights_diff"] < 1e-6 and out["moved"] > 1e-3  # the same update, and an update it was
    for key in ("pg_loss", "ratio_mean", "clip_fraction", "rollout_is_weight_mean", "rollout_is_clip_fraction"):
        assert abs(two[key] - one[key]) < 1e-6, key
    assert one["ratio_mean"] == pytest.approx(1.0) and 0 < one["rollout_is_clip_fraction"] < 1
    # the engine gap comes from the training forward, as the old pass would have given it
    expected = logprob_gap(out["old"], out["engine"], data["loss_mask"])
    assert "logprob_gap_mean" not in two
    assert one["logprob_gap_mean"] == pytest.approx(float(expected["logprob_gap_mean"]), abs=1e-6)
    assert one["logprob_gap_max"] == pytest.approx(float(expected["logprob_gap_max"]), abs=1e-6)
