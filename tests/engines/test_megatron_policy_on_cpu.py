"""GRPO steps on the Megatron policy are layout-invariant: TP=2, TP=1 x DP=2 and PP=2 give the same
log-probs, loss and updated weights (fp32), with images, padding and several micro-batches."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.models.tiny_inputs import hf_logits, image_prompt_batch

LAYOUTS = ((2, 1, 1), (1, 1, 2), (1, 2, 1))
RESPONSE = 4


def make_batch(hf_dir, tmp_path) -> dict:
    ids_a, pix_a, grid_a = image_prompt_batch(hf_dir, tmp_path / "a.png")
    ids_b, pix_b, grid_b = image_prompt_batch(hf_dir, tmp_path / "b.png", question="How many circles?")
    width = max(ids_a.shape[1], ids_b.shape[1]) + RESPONSE
    gen = torch.Generator().manual_seed(0)
    rows, masks = [], []
    text_a, text_b = torch.randint(10, 300, (1, 5), generator=gen), torch.randint(10, 300, (1, 8), generator=gen)
    for prompt in (ids_a, ids_b, text_a, text_b):
        response = torch.randint(10, 300, (1, RESPONSE), generator=gen)
        pad = width - prompt.shape[1] - RESPONSE
        rows.append(torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt, response], dim=1))
        masks.append(torch.cat([torch.zeros(1, pad), torch.ones(1, width - pad)], dim=1))
    ids, attention = torch.cat(rows), torch.cat(masks).long()
    loss_mask = torch.zeros(4, width - 1)
    loss_mask[:, -RESPONSE:] = 1
    # Samples 2 and 3 are text-only.
    assert int((ids[2:] == 5).sum()) == 0
    return {"ids": ids, "attention": attention, "loss_mask": loss_mask, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
                "pixels": torch.cat([pix_a, pix_b]), "grid": torch.cat([grid_a, grid_b])}


def right_padded(data: dict, keys=("ids", "attention", "loss_mask")) -> dict:
    """``make_batch``'s left-padded rows (``keys``) moved to the left end, padding after them (packed sequences
    take right-padded samples); the other entries as they are."""
    pads = (data["attention"].cumsum(dim=1) == 0).sum(dim=1).tolist()  # masked tokens before the first attended
    moved = {key: torch.stack([row.roll(-p) for row, p in zip(data[key], pads)]) for key in keys}
    return {**data, **moved}


def step_worker(hf_dir: str, data: dict, optimizer: str) -> dict:
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import iter_hf_files, load_hf_weights

    arch = load_arch(hf_dir)
    results = {}
    for tp, pp, dp in LAYOUTS:
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        model = Qwen2_5_VLModel(arch, groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        cfg = PolicyOptimConfig(lr=0.5 if optimizer == "sgd" else 1e-2, optimizer=optimizer, grad_clip=1.0,
                                weight_decay=0.0, adam_eps=1e-3, micro_batch_size=1)
        policy = MegatronPolicy(model, groups, cfg)
        rows = slice(groups.dp_rank * 4 // dp, (groups.dp_rank + 1) * 4 // dp)
        has_images = rows.start == 0
        batch = PolicyBatch(
            input_ids_BT=data["ids"][rows], attention_mask_BT=data["attention"][rows],
            loss_mask_BT=data["loss_mask"][rows], advantages_B=data["advantages"][rows],
            pixel_values=data["pixels"] if has_images else None, image_grid_thw=data["grid"] if has_images else None,
        )
        logprobs = policy.compute_logprobs(batch)
        batch.old_logprobs_BT = logprobs - 0.05 if logprobs is not None else torch.zeros_like(batch.loss_mask_BT)
        metrics = policy.train_step(batch)
        weights = {}
        for _, tensors in iter_hf_files(model):
            weights.update(tensors)
        results[(tp, pp, dp)] = {"logprobs": logprobs, "metrics": metrics, "weights": weights, "rows": (rows.start, rows.stop)}
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_step_is_layout_invariant(tmp_path, optimizer):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    data = make_batch(hf_dir, tmp_path)
    per_rank = run_workers(step_worker, world_size=2, args=(str(hf_dir), data, optimizer))

    def merged(layout, key):
        out = {}
        for rank in per_rank:
            value = rank[layout][key]
            if isinstance(value, dict):
                out.update(value)
        return out

    def full_logprobs(layout):
        parts = [(r[layout]["rows"], r[layout]["logprobs"]) for r in per_rank if r[layout]["logprobs"] is not None]
        return torch.cat([lp for rows, lp in sorted(parts, key=lambda p: p[0])[:: (2 if layout[0] == 2 else 1)]])

    reference = full_logprobs((2, 1, 1))
    assert reference.shape == data["loss_mask"].shape
    # Sample 0 (left-padded image prompt) against transformers on its unpadded tokens.
    valid = data["attention"][0].bool()
    ids0 = data["ids"][0][valid][None]
    num_pad = int((~valid).sum())
    hf = torch.log_softmax(hf_logits(hf_dir, ids0, data["pixels"][: len(data["pixels"]) // 2], data["grid"][:1]), dim=-1)
    hf_lp = hf[0, :-1].gather(1, ids0[0, 1:, None]).squeeze(1)
    assert (reference[0, num_pad:] - hf_lp).abs().max() < 1e-5
    for layout in LAYOUTS[1:]:
        assert torch.allclose(full_logprobs(layout), reference, atol=1e-5), layout

    with_tp2 = merged((2, 1, 1), "weights")
    from mmupt_megatron.models.weights import HFWeights

    with HFWeights(hf_dir) as initial:
        assert max((with_tp2[n] - initial.get(n)).abs().max().item() for n in with_tp2) > 1e-3  # it moved
        assert set(with_tp2) == set(initial.names())
    for layout in LAYOUTS[1:]:
        other = merged(layout, "weights")
        for name, tensor in with_tp2.items():
            assert torch.allclose(other[name], tensor, atol=2e-6, rtol=1e-5), (layout, name)
    loss_tp2 = per_rank[0][(2, 1, 1)]["metrics"]["loss"]
    loss_dp2 = sum(r[(1, 1, 2)]["metrics"]["loss"] for r in per_rank)
    assert abs(loss_tp2 - loss_dp2) < 1e-6
    grad_norms = {layout: per_rank[-1][layout]["metrics"]["grad_norm"] for layout in LAYOUTS}
    assert max(grad_norms.values()) - min(grad_norms.values()) < 1e-4, grad_norms


def nan_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel

    groups = init_parallel(ParallelDims(tp=2, pp=1, dp=1))
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=True)
    policy = MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, micro_batch_size=2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    advantages = data["advantages"].clone()
    advantages[1] = float("nan")
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=advantages, old_logprobs_BT=torch.zeros_like(data["loss_mask"]),
                        pixel_values=data["pixels"], image_grid_thw=data["grid"])
    metrics = policy.train_step(batch)
    unchanged = all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    return {"skipped": metrics["skipped"], "unchanged": unchanged}


@pytest.mark.distributed
def test_non_finite_gradients_skip_the_update_on_every_rank(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=1)
    results = run_workers(nan_worker, world_size=2, args=(str(hf_dir), make_batch(hf_dir, tmp_path)))
    assert results == [{"skipped": 1.0, "unchanged": True}] * 2


def offload_worker(hf_dir: str, data: dict) -> dict:
    """Two policies, the same two steps; one offloads everything (weights too) and onloads between them."""
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims(dp=2))  # DP 2 + Adam: Megatron's distributed optimizer
    rows = slice(groups.dp_rank * 2, groups.dp_rank * 2 + 2)
    batch = PolicyBatch(input_ids_BT=data["ids"][rows], attention_mask_BT=data["attention"][rows],
                        loss_mask_BT=data["loss_mask"][rows], advantages_B=data["advantages"][rows],
                        pixel_values=data["pixels"] if rows.start == 0 else None,
                        image_grid_thw=data["grid"] if rows.start == 0 else None)
    policies = []
    for _ in range(2):
        model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
        load_hf_weights(model, hf_dir)
        policies.append(MegatronPolicy(model, groups, PolicyOptimConfig(lr=1e-2, weight_decay=0.0, micro_batch_size=1)))
    out = {}
    for policy in policies:
        batch.old_logprobs_BT = policy.compute_logprobs(batch).detach() - 0.05
        policy.train_step(batch, global_num_tokens=int(data["loss_mask"].sum()), global_num_seqs=4)
    moving = policies[1]
    before = [t.clone() for t in [*moving.model.parameters(), *moving._optimizer_tensors()]]
    out["moved"] = moving.offload(weights=True)
    out["freed"] = all(p.untyped_storage().nbytes() == 0 for p in moving.model.parameters())
    moving.onload(grads=False)  # a checkpoint's onload: weights and optimizer state, the gradients stay off
    out["grads_stay_off"] = all(b.grad_data.untyped_storage().nbytes() == 0 for b in moving.ddp.buffers)
    after = [*moving.model.parameters(), *moving._optimizer_tensors()]
    out["restored"] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    moving.onload()  # then the gradients too
    out["grads_zero"] = all(not b.grad_data.any() for b in moving.ddp.buffers)
    for policy in policies:  # a second step from the restored state equals one from the untouched state
        batch.old_logprobs_BT = policy.compute_logprobs(batch).detach() - 0.05
        policy.train_step(batch, global_num_tokens=int(data["loss_mask"].sum()), global_num_seqs=4)
    out["same_after_step"] = all(torch.equal(a, b) for a, b in zip(policies[0].model.parameters(),
                                                                    policies[1].model.parameters(), strict=True))
    out["num_optimizer_tensors"] = len(moving._optimizer_tensors())
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_offload_onload_round_trip_is_bit_exact(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    for rank in run_workers(offload_worker, world_size=2, args=(str(hf_dir), make_batch(hf_dir, tmp_path))):
        assert rank["moved"] > 0 and rank["freed"] and rank["num_optimizer_tensors"] > 0
        assert rank["restored"] and rank["grads_zero"] and rank["same_after_step"] and rank["grads_stay_off"]
