"""Activation recompute (model.gradient_checkpointing) and sequence parallelism (parallel.sequence_parallel) reach
Megatron's TransformerConfig and change nothing but memory: at TP=2 (gloo), the same log-probs, loss and
gradients (per parameter shard, images included) with each on, and with both, as with neither; packed sequences
(each sequence's slot a multiple of TP, the row split over the TP ranks) with sequence parallelism too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch, right_padded
from tests.tiny_models import make_tiny_qwen2_5_vl

SETTINGS = {"neither": (False, False, False), "recompute": (True, False, False),
            "sequence_parallel": (False, True, False), "both": (True, True, False),
            "packed": (False, True, True), "packed_recompute": (True, True, True)}
"""(recompute, sequence parallelism, packed sequences): packed rows hold right-padded samples (``data["right"]``)."""


def settings_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.models.convert import build_model
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims(tp=2))
    out = {}
    for name, (recompute, sequence_parallel, packed) in SETTINGS.items():
        rows = data["right"] if packed else data
        model = build_model(load_arch(hf_dir), groups, dtype=torch.float32, recompute=recompute,
                            sequence_parallel=sequence_parallel)
        load_hf_weights(model, hf_dir)
        config = model.config
        policy = MegatronPolicy(model, groups, PolicyOptimConfig(optimizer="sgd", lr=0.0, grad_clip=0.0,
                                                                 micro_batch_size=2, sequence_packing=packed))
        batch = PolicyBatch(input_ids_BT=rows["ids"], attention_mask_BT=rows["attention"],
                            loss_mask_BT=rows["loss_mask"], advantages_B=data["advantages"],
                            pixel_values=data["pixels"], image_grid_thw=data["grid"])
        logprobs = policy.compute_logprobs(batch)
        batch.old_logprobs_BT = rows["old"]
        metrics = policy.train_step(batch)  # lr 0: the gradients stay in the buffers, the weights as loaded
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[name] = {"logprobs": logprobs, "loss": metrics["loss"], "grads": grads, "seq_multiple": policy.seq_multiple,
                     "config": (config.recompute_granularity, config.sequence_parallel), "layout": policy.layout}
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_recompute_and_sequence_parallel_keep_loss_and_gradients(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=4)
    data = make_batch(hf_dir, tmp_path)
    data["advantages"] = torch.tensor([1.0, -0.5, 0.75, -0.25])
    if data["ids"].shape[1] % 2 == 0:  # odd: sequence parallelism pads the sequence to a multiple of TP
        data.update(ids=F.pad(data["ids"], (0, 1)), attention=F.pad(data["attention"], (0, 1)),
                    loss_mask=F.pad(data["loss_mask"], (0, 1)))
    data["old"] = -5.0 + 0.1 * torch.randn(data["loss_mask"].shape, generator=torch.Generator().manual_seed(2))
    data["right"] = right_padded(data, keys=("ids", "attention", "loss_mask", "old"))
    pads = (data["attention"].cumsum(dim=1) == 0).sum(dim=1).tolist()  # left padding of each sample
    real = data["attention"][:, :-1].bool()
    for rank in run_workers(settings_worker, world_size=2, args=(str(hf_dir), data)):
        plain = rank["neither"]
        assert plain["config"] == (None, False) and plain["seq_multiple"] == 1
        assert rank["recompute"]["config"] == ("full", False) and rank["sequence_parallel"]["config"] == (None, True)
        assert rank["sequence_parallel"]["seq_multiple"] == 2
        assert abs(plain["loss"]) > 1e-4 and sum(float(g.abs().sum()) for g in plain["grads"].values()) > 0
        assert rank["packed"]["layout"].packed and rank["packed"]["layout"].sequence_multiple == 2
        for name in ("recompute", "sequence_parallel", "both", "packed", "packed_recompute"):
            other = rank[name]
            logprobs, where = other["logprobs"], real
            if SETTINGS[name][2]:  # right-padded rows back to the left-padded layout; next tokens that are real
                logprobs = torch.stack([row.roll(p) for row, p in zip(logprobs, pads)])
                where = (data["attention"][:, :-1] * data["attention"][:, 1:]).bool()
            torch.testing.assert_close(logprobs[where], plain["logprobs"][where], rtol=0, atol=1e-5)
            assert other["loss"] == pytest.approx(plain["loss"], abs=1e-6), name
            assert other["grads"].keys() == plain["grads"].keys()
            for param, grad in plain["grads"].items():
                torch.testing.assert_close(other["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


def test_sequence_parallel_without_tensor_parallelism_is_a_config_error():
    from mmupt_megatron.config import Config, ParallelConfig

    problems = Config(parallel=ParallelConfig(sequence_parallel=True, tensor_parallel_size=1)).problems()
    assert [p for p in problems if p.startswith("parallel.sequence_parallel")] == [
        "parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1, got 1: sequence parallelism splits "
        "the sequence over the TP ranks"]
    assert not [p for p in Config(parallel=ParallelConfig(sequence_parallel=True, tensor_parallel_size=2)).problems()
                if "sequence_parallel" in p]
