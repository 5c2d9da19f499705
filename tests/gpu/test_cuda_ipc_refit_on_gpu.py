"""A refit over CUDA IPC into a second process is bit-exact.

1. The transport alone: the sender packs weights (bf16 and fp32) into one device bucket, ships its IPC handle
   (``torch.multiprocessing.reductions.reduce_tensor``: the same call shares a CPU tensor through shared memory,
   which the CPU dry run exercises), the receiver (a spawned process, as vLLM's engine core is) rebuilds the
   bucket, copies its slices into its own weights and reports them back. Two rounds through the same bucket, the
   second after the weights changed, as successive training steps would.
2. The project's own refit: a Megatron policy streams its weights with ``send_refit`` through the trainer's
   ``HandleSender`` (``engines/device_transport.py``: one reused device frame, a ``share_tensor`` handle per
   bucket) into a second process that opens each handle as vLLM's workers do (``vllm_worker.open_shared`` +
   ``weight_transport.decode_bucket``, without vLLM) and returns what it read: equal, bit for bit, to the HF
   checkpoint the policy loaded (cast to the policy's dtype) and, after a training step, to the policy's own HF
   export (``iter_hf_groups``), with many buckets through one reused frame.
"""

from __future__ import annotations

import torch

from mmupt_megatron.distributed.parallel import run_workers
from tests.gpu import DEVICE, GPU, ON_CPU, record
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = GPU

SHAPES = {"embed": ((300, 64), torch.bfloat16), "qkv": ((192, 64), torch.bfloat16), "norm": ((64,), torch.float32),
          "bias": ((7,), torch.bfloat16), "head": ((300, 64), torch.float32)}


def _sync() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()


def _manifest() -> tuple[list[tuple[str, int, int]], int]:
    """[(name, byte offset, byte size)] with 256-byte aligned slices, and the bucket's size."""
    out, offset = [], 0
    for name, (shape, dtype) in SHAPES.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append((name, offset, size))
        offset += -(-size // 256) * 256
    return out, offset


def _view(bucket: torch.Tensor, name: str, offset: int, size: int) -> torch.Tensor:
    shape, dtype = SHAPES[name]
    return bucket[offset : offset + size].view(dtype).view(shape)


def receiver(inbox, outbox) -> None:
    """The engine side: its own weights, loaded from each bucket handle it is sent."""
    if not ON_CPU:
        torch.cuda.set_device(0)
    weights = {name: torch.zeros(shape, dtype=dtype, device=DEVICE) for name, (shape, dtype) in SHAPES.items()}
    manifest, _ = _manifest()
    while (message := inbox.get()) is not None:
        rebuild, args = message
        bucket = rebuild(*args)
        assert bucket.device.type == DEVICE and bucket.dtype == torch.uint8
        for name, offset, size in manifest:
            weights[name].copy_(_view(bucket, name, offset, size))
        _sync()
        del bucket
        outbox.put({name: tensor.cpu() for name, tensor in weights.items()})


def test_cuda_ipc_refit_into_a_second_process_is_bit_exact():
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = torch.multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=receiver, args=(inbox, outbox), daemon=True)
    proc.start()
    try:
        manifest, total = _manifest()
        bucket = torch.zeros(total, dtype=torch.uint8, device=DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        for round_ in range(2):
            policy = {name: torch.randn(shape, generator=gen, device=DEVICE).to(dtype) * (round_ + 1)
                      for name, (shape, dtype) in SHAPES.items()}
            policy["bias"][0] = float("inf") if round_ else -0.0  # special values travel as bits
            for name, offset, size in manifest:
                _view(bucket, name, offset, size).copy_(policy[name])
            _sync()
            inbox.put(reduce_tensor(bucket))  # (rebuild function, picklable handle args)
            received = outbox.get(timeout=120)
            for name, tensor in policy.items():
                got = received[name]
                assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
                assert torch.equal(got.view(torch.uint8), tensor.cpu().view(torch.uint8)), f"{name} differs in round {round_}"
        inbox.put(None)
        proc.join(timeout=60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------------------------------------- the policy's refit
def engine_side(inbox, outbox) -> None:
    """What ``vllm_worker.RefitExtension.mmupt_load_shared`` does for each bucket, minus vLLM's reload: open the
    handle, decode the frame, keep host copies (the frame is reused for the next bucket)."""
    from mmupt_megatron.engines.vllm_worker import open_shared
    from mmupt_megatron.engines.weight_transport import decode_bucket

    if not ON_CPU:
        torch.cuda.set_device(0)
    else:
        torch.multiprocessing.set_sharing_strategy("file_system")
    received: dict[str, torch.Tensor] = {}
    while (message := inbox.get()) is not None:
        if message == "done":
            outbox.put(received)
            received = {}
            continue
        handle, size = message
        frame = open_shared(handle)[:size]
        assert frame.device.type == DEVICE, frame.device
        _, tensors = decode_bucket(frame)
        for name, tensor in tensors:
            assert name not in received, f"{name} sent twice in one refit"
            received[name] = tensor.to("cpu", copy=True)
        del frame, tensors
        _sync()
        outbox.put(len(received))  # loaded: the sender may overwrite the frame


def policy_refit_worker(hf_dir: str, data: dict, bucket_bytes: int) -> dict:
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.device_transport import HandleSender
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyBatch, PolicyOptimConfig
    from mmupt_megatron.engines.weight_sync import send_refit
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.hf_gather import iter_hf_groups
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    model = Qwen2_5_VLModel(load_arch(hf_dir), groups, init_weights=False, layer_spec="local")
    load_hf_weights(model, hf_dir)
    policy = MegatronPolicy(model, groups, PolicyOptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0, micro_batch_size=2))
    ctx = torch.multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=engine_side, args=(inbox, outbox), daemon=True)
    proc.start()
    frames: list[int] = []

    def notify(handle: bytes, size: int) -> None:
        inbox.put((handle, size))
        outbox.get(timeout=120)  # the engine has read this bucket

    sender = HandleSender(offer=lambda manifest: None, notify=notify)
    out: dict = {"rounds": []}
    try:
        for round_ in range(2):
            if round_:  # a training step changes every trained weight
                batch = PolicyBatch(input_ids_BT=data["ids"], attention_mask_BT=data["attention"],
                                    loss_mask_BT=data["loss_mask"], advantages_B=data["advantages"],
                                    pixel_values=data["pixels"], image_grid_thw=data["grid"])
                policy.train_step(batch)
            stats = send_refit(model, sender, bucket_bytes=bucket_bytes)
            frames.append(sender.frame.tensor.data_ptr())
            inbox.put("done")
            received = outbox.get(timeout=120)
            expected = {name: t.cpu() for _, group in iter_hf_groups(model) for name, t in group.items()}
            out["rounds"].append({"received": received, "expected": expected, "num_buckets": stats.num_buckets,
                                  "num_bytes": stats.num_bytes, "frame_device": sender.frame.tensor.device.type})
        inbox.put(None)
        proc.join(timeout=60)
        out["exitcode"] = proc.exitcode
    finally:
        if proc.is_alive():
            proc.kill()
    out["one_frame"] = len(set(frames)) == 1
    out["dtype"] = str(next(model.parameters()).dtype)
    return out


def test_policy_refit_through_handle_sender_into_a_second_process_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    from tests.engines.test_megatron_policy_on_cpu import make_batch
    from tests.gpu import DTYPE

    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=5)
    data = make_batch(hf_dir, tmp_path)
    (out,) = run_workers(policy_refit_worker, world_size=1, args=(str(hf_dir), data, 64 << 10))
    first, second = out["rounds"]
    record("policy_refit", dtype=out["dtype"], buckets=[r["num_buckets"] for r in out["rounds"]],
           bytes=[r["num_bytes"] for r in out["rounds"]])
    assert out["exitcode"] == 0 and out["one_frame"]
    assert first["frame_device"] == DEVICE and first["num_buckets"] > 3  # many buckets through one reused frame
    hf = {name: tensor.to(DTYPE) for name, tensor in load_file(str(hf_dir / "model.safetensors")).items()}
    for round_ in (first, second):
        assert round_["received"].keys() == round_["expected"].keys()
        for name, tensor in round_["expected"].items():
            got = round_["received"][name]
            assert got.dtype == tensor.dtype == DTYPE and got.shape == tensor.shape, name
            assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    # round 1 is the checkpoint the policy loaded, in its dtype (names as vLLM loads them)
    common = first["received"].keys() & hf.keys()
    assert len(common) >= 0.9 * len(first["received"]), sorted(first["received"].keys() - hf.keys())[:5]
    for name in common:
        assert torch.equal(first["received"][name], hf[name]), name
    changed = sum(not torch.equal(first["received"][n], second["received"][n]) for n in first["received"])
    assert changed >= len(first["received"]) // 2  # the step reached the engine

