"""The trainer's policy worker (``trainer/workers.PolicyWorker``, the class Ray starts, here in one spawned process
without Ray) on one GPU in bf16, through the calls the trainer makes in a step:

- log-probs of the policy and of the frozen reference, returned in host memory (``@host_results``);
- GRPO updates with old log-probs and the KL term to the reference (``algorithm.loss.kl_coef`` > 0): KL 0 while
  the policy is the reference, > 0 after an update;
- the colocated schedule's offload / onload (policy state and the reference's weights off the device, back
  bit-exactly);
- a checkpoint save (policy + optimizer dist-checkpoints) with its device-memory peak and time, and a load of it
  after another update restoring the saved log-probs and optimizer state bit-exactly.

With ``MMUPT_GPU_SUITE_DEVICE=cpu`` the same runs on the CPU in fp32 (no allocator figures there)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mmupt_megatron.distributed.parallel import run_workers
from tests.engines.test_megatron_policy_on_cpu import make_batch
from tests.gpu import DEVICE, GPU, ON_CPU, record
from tests.gpu.state_copies import equal_nested, snapshot, tensors
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = GPU
KL_COEF = 0.05


def _allocated() -> int | None:
    if ON_CPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _host(value) -> bool:
    """Every tensor in ``value`` is in host memory."""
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu"
    if isinstance(value, dict):
        return all(_host(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_host(v) for v in value)
    return True


def _optimizer_copy(worker) -> dict:
    """A host copy of the optimizer's state dict (moments, step, fp32 main params)."""
    return snapshot(worker.policy.optimizer.state_dict())


def worker_steps(hf_dir: str, data: dict, folder: str) -> dict:
    from mmupt_megatron.algorithms.loss import PolicyLossConfig
    from mmupt_megatron.distributed.parallel import ParallelDims
    from mmupt_megatron.engines.megatron_policy import PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.trainer.workers import PolicyWorker

    optim = PolicyOptimConfig(lr=1e-3, weight_decay=0.0, micro_batch_size=2, loss=PolicyLossConfig(kl_coef=KL_COEF))
    worker = PolicyWorker(rank=0, world_size=1, master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]),
                          dims=ParallelDims(), model_dir=hf_dir, optim=optim, with_reference=True, seed=0,
                          local_rank=0)
    out: dict = {"param_dtype": str(worker.param_dtype()),
                 "param_device": next(worker.policy.model.parameters()).device.type}
    batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"], loss_mask_BT=data["loss_mask"],
                        advantages_B=data["advantages"], pixel_values=data["pixels"], image_grid_thw=data["grid"])
    tokens, seqs = float(data["loss_mask"].sum()), float(data["ids"].shape[0])
    returned = []

    def step() -> dict:
        batch.old_logprobs_BT = worker.logprobs(batch)
        batch.ref_logprobs_BT = worker.logprobs(batch, reference=True)
        metrics = worker.train(batch, global_num_tokens=tokens, global_num_seqs=seqs)
        returned.extend([batch.old_logprobs_BT, batch.ref_logprobs_BT, metrics])
        return metrics

    first = step()  # the policy is the reference: KL 0
    out["ref_gap"] = float((batch.old_logprobs_BT - batch.ref_logprobs_BT).abs().max())  # two equal models
    second = step()  # one update later: KL > 0
    out["metrics"] = [first, second]
    out["logprobs_shape"] = tuple(batch.old_logprobs_BT.shape)
    out["on_host"] = _host(returned) and all(isinstance(v, float) for m in (first, second) for v in m.values())

    # the colocated schedule: offload (policy state and the reference's weights), onload, the same log-probs
    before = worker.logprobs(batch)
    ref_before = worker.logprobs(batch, reference=True)
    out["resident"] = _allocated()
    out["moved"] = worker.offload()
    out["offloaded"] = _allocated()
    worker.onload()
    worker.onload_reference()
    out["restored"] = _allocated()
    out["offload_exact"] = bool(torch.equal(worker.logprobs(batch), before)
                                and torch.equal(worker.logprobs(batch, reference=True), ref_before))

    # a checkpoint save: its device-memory peak above the resident state, its time and size
    saved_logprobs, saved_optim = worker.logprobs(batch), _optimizer_copy(worker)
    if not ON_CPU:
        base = _allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    worker.save(folder)
    out["save_s"] = time.perf_counter() - start
    out["save_peak_extra"] = None if ON_CPU else torch.cuda.max_memory_allocated() - base
    out["save_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    step()  # the weights and the optimizer move on ...
    out["moved_on"] = not torch.equal(worker.logprobs(batch), saved_logprobs)
    worker.load(folder)  # ... and come back
    out["load_exact"] = bool(torch.equal(worker.logprobs(batch), saved_logprobs))
    out["optim_tensors"] = len(tensors(saved_optim))
    out["load_optim_exact"] = equal_nested(_optimizer_copy(worker), saved_optim)
    return out


def test_policy_worker_grpo_with_kl_offload_and_checkpoint(tmp_path):
    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=11)
    data = make_batch(hf_dir, tmp_path)
    (out,) = run_workers(worker_steps, world_size=1, args=(str(hf_dir), data, str(tmp_path / "ckpt")))
    record("policy_worker", **{k: v for k, v in out.items() if k != "metrics"},
           kl=[m.get("kl_ref") for m in out["metrics"]], loss=[m.get("loss") for m in out["metrics"]])
    assert out["param_device"] == DEVICE
    assert out["param_dtype"] == ("torch.float32" if ON_CPU else "torch.bfloat16")
    assert out["on_host"], "a worker returned a tensor in device memory"
    assert out["logprobs_shape"] == (4, data["ids"].shape[1] - 1)
    first, second = out["metrics"]
    assert first["skipped"] == second["skipped"] == 0.0
    # the reference is the initial policy: the same log-probs (bit-equal on CPU; bf16 kernels on two copies of
    # the weights may differ in the last bit), so KL 0 before the first update
    assert out["ref_gap"] <= (0.0 if ON_CPU else 1e-2) and abs(first["kl_ref"]) <= (1e-6 if ON_CPU else 1e-3)
    assert second["kl_ref"] > 0 and torch.isfinite(torch.tensor(second["loss"]))
    assert out["offload_exact"]
    if not ON_CPU:
        assert out["resident"] - out["offloaded"] >= 0.95 * out["moved"]
        assert abs(out["restored"] - out["resident"]) <= 0.01 * out["resident"]
        # a save streams the state to files: it must not need a second copy of it on the device
        assert out["save_peak_extra"] <= 0.5 * out["resident"] + (64 << 20), out["save_peak_extra"]
    assert out["save_bytes"] > 0 and out["moved_on"]
    assert out["load_exact"] and out["optim_tensors"] > 0 and out["load_optim_exact"]
