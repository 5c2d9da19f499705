"""FP8 on the policy: padding to a multiple of 16 x TP changes no log-prob, loss or gradient, and
``model.fp8=true`` where FP8 cannot run (here: no GPU, no Transformer Engine) stops at start naming the key."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from mmupt_megatron.engines.megatron_policy import PolicyBatch, pad_sequences
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.tiny_models import make_tiny_qwen2_5_vl


def test_pad_sequences_rounds_up_with_masked_positions():
    batch = PolicyBatch(input_ids_BT=torch.arange(1, 11).reshape(2, 5), loss_mask_BT=torch.ones(2, 4),
                        old_logprobs_BT=torch.full((2, 4), -1.0))
    padded = pad_sequences(batch, 16, pad_id=7)
    assert padded.input_ids_BT.shape == (2, 16) and padded.loss_mask_BT.shape == (2, 15)
    assert torch.equal(padded.input_ids_BT[:, :5], batch.input_ids_BT)
    assert bool((padded.input_ids_BT[:, 5:] == 7).all())
    assert torch.equal(padded.attention_mask_BT, (torch.arange(16) < 5).long().expand(2, 16))
    assert float(padded.loss_mask_BT[:, 4:].abs().sum()) == 0 and float(padded.old_logprobs_BT[:, 4:].abs().sum()) == 0
    assert pad_sequences(batch, 5) is batch and pad_sequences(batch, 1) is batch
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        pad_sequences(batch, 0)


def padding_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False)
    load_hf_weights(model, hf_dir)
    policy = MegatronPolicy(model, groups, PolicyOptimConfig(optimizer="sgd", lr=0.0, micro_batch_size=2))
    assert policy.seq_multiple == 1  # FP8 off
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    out = {}
    for multiple in (1, 16):
        policy.seq_multiple = multiple
        logprobs = policy.compute_logprobs(batch)
        batch.old_logprobs_BT = (logprobs - 0.05).detach() if multiple == 1 else batch.old_logprobs_BT
        metrics = policy.train_step(batch)  # lr 0: weights stay, the loss and grad norm are reported
        out[multiple] = {"logprobs": logprobs, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
    return out


@pytest.mark.distributed
def test_padding_to_the_fp8_multiple_changes_nothing(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=3)
    data = make_batch(hf_dir, tmp_path)
    data["advantages"] = torch.tensor([1.0, -0.5, 0.75, -0.25])  # not summing to 0: a non-zero loss to compare
    assert data["ids"].shape[1] % 16  # the padding does add positions
    (out,) = run_workers(padding_worker, world_size=1, args=(str(hf_dir), data))
    plain, padded = out[1], out[16]
    assert plain["logprobs"].shape == padded["logprobs"].shape == (4, data["ids"].shape[1] - 1)
    # Positions of real tokens (the left padding of make_batch is attention 0 like the added positions; a fully
    # masked query row there attends uniformly to every key, so its garbage depends on the length).
    real = data["attention"][:, :-1].bool()
    torch.testing.assert_close(padded["logprobs"][real], plain["logprobs"][real], rtol=0, atol=1e-5)
    assert abs(plain["loss"]) > 1e-6 and plain["grad_norm"] > 0
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
    assert padded["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_fp8_without_hopper_or_transformer_engine_is_an_error_naming_the_key():
    from mmupt_megatron.models.qwen2_5_vl import check_fp8, fp8_problems, select_layer_spec, uses_te_spec

    assert not torch.cuda.is_available()  # this test describes a CPU machine
    assert fp8_problems(False) == []
    with pytest.raises(ValueError, match=r"model\.fp8=true needs a CUDA GPU \(Hopper or newer\)"):
        check_fp8(True, "delayed")
    with pytest.raises(ValueError, match=r"model\.fp8_recipe must be one of"):
        check_fp8(True, "hybrid")
    # The model calls select_layer_spec before it builds any layer: it refuses instead of falling back.
    with pytest.raises(ValueError, match=r"model\.fp8=true needs Transformer Engine"):
        select_layer_spec(fp8=True)
    spec, fp8_mode = select_layer_spec(fp8=False)
    assert fp8_mode is None and not uses_te_spec(spec)


def test_trainer_refuses_fp8_before_loading_anything(tmp_path):
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.loop import Trainer

    missing = tmp_path / "not-there"
    cfg = load_config("demo", ["model.fp8=true", f"model.path={missing}", f"data.train_files=[{missing}]"])
    with pytest.raises(ValueError, match=r"model\.fp8=true needs a CUDA GPU"):
        Trainer(cfg)  # the data file does not exist: the FP8 error comes first
