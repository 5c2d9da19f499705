"""A refit over CUDA IPC into a second process is bit-exact: the sender packs weights (bf16 and fp32) into one
device bucket, ships its IPC handle (``torch.multiprocessing.reductions.reduce_tensor``: the same call shares a
CPU tensor through shared memory, which CI exercises), the receiver (a spawned process, as vLLM's engine core
is) rebuilds the bucket, copies its slices into its own weights and reports them back. Two rounds through
the same bucket, the second after the weights changed, as successive training steps would."""

from __future__ import annotations

import torch

from tests.gpu import GPU

pytestmark = GPU

SHAPES = {"embed": ((300, 64), torch.bfloat16), "qkv": ((192, 64), torch.bfloat16), "norm": ((64,), torch.float32),
          "bias": ((7,), torch.bfloat16), "head": ((300, 64), torch.float32)}


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
    torch.cuda.set_device(0)
    weights = {name: torch.zeros(shape, dtype=dtype, device="cuda") for name, (shape, dtype) in SHAPES.items()}
    manifest, _ = _manifest()
    while (message := inbox.get()) is not None:
        rebuild, args = message
        bucket = rebuild(*args)
        assert bucket.is_cuda and bucket.dtype == torch.uint8
        for name, offset, size in manifest:
            weights[name].copy_(_view(bucket, name, offset, size))
        torch.cuda.synchronize()
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
        bucket = torch.zeros(total, dtype=torch.uint8, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        for round_ in range(2):
            policy = {name: torch.randn(shape, generator=gen, device="cuda").to(dtype) * (round_ + 1)
                      for name, (shape, dtype) in SHAPES.items()}
            policy["bias"][0] = float("inf") if round_ else -0.0  # special values travel as bits
            for name, offset, size in manifest:
                _view(bucket, name, offset, size).copy_(policy[name])
            torch.cuda.synchronize()
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
