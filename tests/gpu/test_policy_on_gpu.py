"""The Megatron policy on one GPU (bf16): logits against transformers, one GRPO step, and offload / onload
freeing and restoring device memory. Local layer spec always; Transformer Engine spec (and FP8 on Hopper)
where TE imports. Each case runs in its own spawned process (Megatron's parallel state is global).
With ``MMUPT_GPU_SUITE_DEVICE=cpu`` the local-spec cases run on the CPU in fp32 (``tests/gpu/__init__.py``)."""

from __future__ import annotations

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch, right_padded
from tests.gpu import DEVICE, DTYPE, GPU, ON_CPU, record
from tests.gpu.state_copies import equal_nested, snapshot, tensors
from tests.models.tiny_inputs import hf_logits, image_prompt_batch
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = GPU


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def _te_runs_here() -> bool:
    return not ON_CPU and _te_importable()


SPECS = ["local", pytest.param("te", marks=pytest.mark.skipif(not _te_runs_here(), reason="Transformer Engine does not import"))]
BF16_ATOL = 0.1
"""bf16 has 8 bits of mantissa: a tiny model's logits (|x| < ~5) agree with fp32 to a few 1e-2."""
ATOL = 1e-4 if ON_CPU else BF16_ATOL
"""The CPU dry run is fp32 throughout: the logits agree with transformers' to rounding."""


def _policy(hf_dir: str, spec: str, *, fp8: bool = False, optimizer: str = "adam", lr: float = 1e-3,
            sequence_packing: bool | None = None):
    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False, layer_spec=spec, fp8=fp8)
    load_hf_weights(model, hf_dir)
    assert all(p.device.type == DEVICE and p.dtype == DTYPE for p in model.parameters())
    cfg = PolicyOptimConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, micro_batch_size=2,
                            sequence_packing=sequence_packing)
    return groups, model, MegatronPolicy(model, groups, cfg)


def logits_worker(hf_dir: str, spec: str, inputs: tuple, fp8: bool) -> torch.Tensor:
    from mmupt_megatron.models.qwen2_5_vl import gather_logits
    from mmupt_megatron.models.rope_index import causal_attention_mask, mrope_position_ids

    groups, model, _ = _policy(hf_dir, spec, fp8=fp8)
    ids, pixels, grid = (t.to(DEVICE) for t in inputs)
    positions = mrope_position_ids(ids, image_token_id=model.arch.image_token_id, image_grid_thw=grid)
    model.eval()
    with torch.no_grad():
        out = model(ids, positions, causal_attention_mask(ids.shape[1], device=ids.device), pixels, grid)
        logits = gather_logits(out, groups, vocab_size=model.arch.vocab_size)
    return logits.float().cpu()


@pytest.mark.parametrize("spec", SPECS)
def test_logits_match_transformers_within_bf16(tmp_path, spec):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=1)
    inputs = image_prompt_batch(hf_dir, tmp_path / "image.png")
    expected = hf_logits(hf_dir, *inputs)  # transformers, fp32, on the CPU
    (got,) = run_workers(logits_worker, world_size=1, args=(str(hf_dir), spec, inputs, False))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) > 0.9


def _fp8_runs_here() -> bool:
    return not ON_CPU and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and _te_importable()


@pytest.mark.skipif(not _fp8_runs_here(), reason="FP8 needs Transformer Engine and a Hopper-or-newer GPU")
def test_fp8_policy_pads_to_16_and_gives_finite_logprobs(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=1)
    data = right_padded(make_batch(hf_dir, tmp_path))
    (out,) = run_workers(fp8_worker, world_size=1, args=(str(hf_dir), data))
    assert out["seq_multiple"] == 16
    assert out["logprobs_shape"] == (4, data["ids"].shape[1] - 1)
    assert out["finite"]


def fp8_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    _, _, policy = _policy(hf_dir, "te", fp8=True)
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    logprobs = policy.compute_logprobs(batch)
    return {"seq_multiple": policy.seq_multiple, "logprobs_shape": tuple(logprobs.shape),
            "finite": bool(torch.isfinite(logprobs).all())}


def grpo_worker(hf_dir: str, spec: str, data: dict) -> dict:
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    _, model, policy = _policy(hf_dir, spec)
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logprobs = policy.compute_logprobs(batch)
    batch.old_logprobs_BT = logprobs.detach()
    metrics = policy.train_step(batch)
    after = policy.compute_logprobs(batch)
    changed = sum(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    mask = data["loss_mask"].to(DEVICE).bool()
    # advantages > 0 for samples 0 and 2: their response tokens should become more likely
    gain = [float((after[b] - logprobs[b])[mask[b]].mean()) for b in range(4)]
    return {"metrics": metrics, "changed": changed, "num_params": len(before), "gain": gain}


@pytest.mark.parametrize("spec", SPECS)
def test_one_grpo_step(tmp_path, spec):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    data = right_padded(make_batch(hf_dir, tmp_path))
    (out,) = run_workers(grpo_worker, world_size=1, args=(str(hf_dir), spec, data))
    metrics = out["metrics"]
    assert metrics["skipped"] == 0.0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert 0 < metrics["grad_norm"] < float("inf")
    assert out["changed"] >= out["num_params"] // 2
    adv = data["advantages"].tolist()
    assert sum(g for g, a in zip(out["gain"], adv) if a > 0) > sum(g for g, a in zip(out["gain"], adv) if a < 0)


def packing_worker(hf_dir: str, spec: str, data: dict, fp8: bool) -> dict:
    """The same batch through bucketed micro-batches and through packed rows (TE: its THD attention), lr 0."""
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    out = {"default_packed": _policy(hf_dir, spec, fp8=fp8)[2].layout.packed}
    for packed in (False, True):
        _, _, policy = _policy(hf_dir, spec, fp8=fp8, optimizer="sgd", lr=0.0, sequence_packing=packed)
        batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                            advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
        logprobs = policy.compute_logprobs(batch)
        batch.old_logprobs_BT = logprobs.detach() - 0.1
        metrics = policy.train_step(batch)
        out[packed] = {"logprobs": logprobs.float().cpu(), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                       "layout": policy.layout}
    return out


PACKING_CASES = [pytest.param("local", False, id="local"),
                 pytest.param("te", False, id="te", marks=pytest.mark.skipif(not _te_runs_here(), reason="no TE")),
                 pytest.param("te", True, id="te-fp8", marks=pytest.mark.skipif(not _fp8_runs_here(), reason="no FP8"))]


@pytest.mark.parametrize(("spec", "fp8"), PACKING_CASES)
def test_packed_rows_match_bucketed_micro_batches(tmp_path, spec, fp8):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    data = right_padded(make_batch(hf_dir, tmp_path))
    (out,) = run_workers(packing_worker, world_size=1, args=(str(hf_dir), spec, data, fp8))
    assert out["default_packed"] == (spec == "te")  # trainer.sequence_packing=auto: packed where TE runs
    assert out[True]["layout"].packed and out[True]["layout"].multiple == (16 if fp8 else 1)
    valid = data["loss_mask"].bool()
    torch.testing.assert_close(out[True]["logprobs"][valid], out[False]["logprobs"][valid], rtol=0,
                               atol=0.5 if fp8 else ATOL)
    assert out[True]["loss"] == pytest.approx(out[False]["loss"], rel=0.05 if fp8 else 0.02, abs=0.01)
    assert 0 < out[True]["grad_norm"] < float("inf")


def _held_bytes(tensors) -> int:
    """Bytes of the distinct storages on the suite's device behind ``tensors`` (an offloaded storage counts 0)."""
    sizes = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.device.type == DEVICE:
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def _sync() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _allocated() -> int | None:
    return None if ON_CPU else torch.cuda.memory_allocated()


def offload_worker(hf_dir: str, data: dict) -> dict:
    from mmupt_megatron.engines.megatron_policy import PolicyBatch

    _, model, policy = _policy(hf_dir, "local")
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    batch.old_logprobs_BT = policy.compute_logprobs(batch).detach()
    policy.train_step(batch)  # creates gradients and Adam state

    def held() -> int:  # what the policy holds: weights, gradient buffers, optimizer state and main params
        grads = [b.grad_data for b in policy.ddp.buffers]
        return _held_bytes([*model.parameters(), *grads, *tensors(policy.optimizer.state_dict())])

    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    optim = snapshot(policy.optimizer.state_dict())
    _sync()
    resident, held_resident = _allocated(), held()
    moved = policy.offload()  # weights stay on the device (the engine's refit reads them)
    _sync()
    offloaded, held_offloaded = _allocated(), held()
    policy.onload()
    _sync()
    restored, held_restored = _allocated(), held()
    exact = all(torch.equal(p.detach().cpu(), state[name]) for name, p in model.named_parameters())
    exact_optim = equal_nested(snapshot(policy.optimizer.state_dict()), optim)
    logprobs_again = policy.compute_logprobs(batch)
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"resident": resident, "offloaded": offloaded, "restored": restored, "moved": moved,
            "held_resident": held_resident, "held_offloaded": held_offloaded, "held_restored": held_restored,
            "exact": exact, "exact_optim": exact_optim, "optim_tensors": len(tensors(optim)),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "trained_numel": sum(p.numel() for p in trained),
            "finite": bool(torch.isfinite(logprobs_again).all())}


def test_snapshot_is_a_copy_not_the_live_state():
    """The optimizer check compares against a copy: zeroing the live tensors afterwards leaves it unequal."""
    live = {"state": {0: {"exp_avg": torch.ones(3)}}, "fp32_from_fp16_params": [[torch.full((2,), 2.0)]]}
    copy = snapshot(live)
    assert equal_nested(copy, live)
    for tensor in tensors(live):
        tensor.zero_()
    assert not equal_nested(copy, live)


def test_offload_frees_and_onload_restores_memory(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7, hidden_size=512, num_heads=8, num_kv_heads=2,
                                  intermediate_size=2048, num_layers=4)
    data = make_batch(hf_dir, tmp_path)
    (out,) = run_workers(offload_worker, world_size=1, args=(str(hf_dir), data))
    record("offload", **out)
    # What offload moves (weights=False: the weights stay): the fp32 gradient buffer (4 bytes per trained
    # parameter), Adam's m and v (8) and, with bf16 weights, the fp32 main parameters (4): 16 bytes per 2 bytes
    # of bf16 weights on GPU, 12 per 4 bytes of fp32 weights on CPU. What stays is the weights themselves: 2 of
    # the ~18 bytes per parameter on GPU (~11%).
    expected = out["trained_numel"] * (12 if DTYPE == torch.float32 else 16)
    assert out["moved"] >= 0.95 * expected, (out["moved"], expected)
    assert out["held_resident"] - out["held_offloaded"] >= 0.95 * out["moved"]
    assert out["held_offloaded"] == out["param_bytes"]  # exactly the weights are left
    assert out["held_restored"] == out["held_resident"]
    if not ON_CPU:  # the allocator's own figures
        # freed: what offload moved; left: the weights plus what was never the policy's (cuBLAS workspaces,
        # Megatron's attention scratch buffer: ``resident - held_resident``), nothing else
        assert out["resident"] - out["offloaded"] >= 0.95 * out["moved"]
        others = out["resident"] - out["held_resident"]
        assert out["param_bytes"] <= out["offloaded"] <= out["param_bytes"] + others + 0.01 * out["resident"], \
            f"left on the device after offload: {out['offloaded']} bytes (weights {out['param_bytes']}, not the policy's {others})"
        assert abs(out["restored"] - out["resident"]) <= 0.01 * out["resident"]
    assert out["optim_tensors"] > 0
    assert out["exact"] and out["exact_optim"] and out["finite"]
