"""Refit buckets that live in one tensor on the sender's device and reach the engines without a host copy.

- ``HandleSender``: engines on the sender's device open the bucket through a handle (``vllm_worker.share_tensor``):
  on GPU a CUDA IPC handle, so a colocated engine (same GPU) reads the policy's bucket in place, the NeMo-RL way;
  on CPU a shared-memory file (torch's ``file_system`` sharing strategy, set here for this process).
- ``BroadcastSender``: engines anywhere (other GPUs, other nodes) receive the bucket by a broadcast over a process
  group of their own that the sender starts on first use (sender = rank 0, every engine worker one rank): NCCL
  between GPUs, gloo on CPU — one code path, so CI runs it. Not for an engine on the sender's own GPU (NCCL
  cannot hold one device twice): that is what ``HandleSender`` is for.

    sender = HandleSender(offer=check_manifest, notify=lambda handle, size: load_everywhere(handle, size))
    send_refit(model, sender, bucket_bytes=...)    # weight_sync: packs each bucket into sender.buffer(layout)

The bucket tensor is grown to the largest bucket (in 1 MiB steps) and reused; ``send`` returns once every engine
has loaded the bucket, so the next one may overwrite it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmupt_megatron.engines.vllm_worker import broadcast, refit_group, share_tensor
from mmupt_megatron.engines.weight_transport import BucketLayout, ManifestEntry, _frame_prefix

_GROW = 1 << 20


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _DeviceFrame:
    """One frame tensor on ``device``, grown when a bucket needs more; ``on_grow`` sees each new tensor."""

    def __init__(self, device: torch.device, on_grow: Callable[[torch.Tensor], None] = lambda frame: None) -> None:
        self.device, self.on_grow = device, on_grow
        self.tensor = torch.empty(0, dtype=torch.uint8, device=device)
        self.size = 0

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        prefix = _frame_prefix(layout)
        self.size = len(prefix) + layout.nbytes
        if self.tensor.numel() < self.size:
            self.tensor = torch.empty(-(-self.size // _GROW) * _GROW, dtype=torch.uint8, device=self.device)
            self.on_grow(self.tensor)
        self.tensor[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
        return self.tensor[len(prefix) : self.size]

    def ready(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the packing's copies are done before another process reads

    def release(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8, device=self.device)


class HandleSender:
    def __init__(self, *, offer: Callable[[Sequence[ManifestEntry]], str | None],
                 notify: Callable[[bytes, int], None], device: torch.device | None = None) -> None:
        self._offer, self._notify = offer, notify
        device = device or default_device()
        if device.type == "cpu":
            torch.multiprocessing.set_sharing_strategy("file_system")  # handles that are file names
        self._handle = b""
        self.frame = _DeviceFrame(device, self._share)

    def _share(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            tensor.share_memory_()
        self._handle = share_tensor(tensor)

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        return self._offer(manifest)

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        return self.frame.buffer(layout)

    def send(self, layout: BucketLayout) -> None:  # noqa: ARG002 - the frame names its tensors
        self.frame.ready()
        self._notify(self._handle, self.frame.size)

    def close(self) -> None:
        pass

    def release(self) -> None:
        """Drop the bucket tensor (the engines' mappings go with their own references)."""
        self.frame.release()
        self._handle = b""


class BroadcastSender:
    """``join(host, port, world)`` asks the engines to join the group (returns a wait function);
    ``receive(size)`` asks them to take part in the next broadcast and load it (returns a wait function);
    ``workers``: how many engine workers join (the group's world is 1 + workers); ``timeout_s``: the group's
    rendezvous and each broadcast fail past it (``rollout.refit_timeout_s``)."""

    def __init__(self, *, offer: Callable[[Sequence[ManifestEntry]], str | None], workers: int,
                 join: Callable[[str, int, int], Callable[[], Any]], receive: Callable[[int], Callable[[], Any]],
                 host: str, device: torch.device | None = None, timeout_s: float = 600.0) -> None:
        self._offer, self._join, self._receive = offer, join, receive
        self.world, self.host, self.timeout_s = 1 + workers, host, timeout_s
        self.name = ""
        self.frame = _DeviceFrame(device or default_device())
        self.group: Any = None

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        refusal = self._offer(manifest)
        if refusal is None and self.group is None:
            with socket.socket() as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            joined = self._join(self.host, port, self.world)  # the engines connect to our store meanwhile
            self.group = refit_group(self.host, port, 0, self.world, self.frame.device, timeout_s=self.timeout_s)
            self.name = f"{self.host}:{port}"
            joined()
        return refusal

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        return self.frame.buffer(layout)

    def send(self, layout: BucketLayout) -> None:  # noqa: ARG002 - the frame names its tensors
        self.frame.ready()
        loaded = self._receive(self.frame.size)
        broadcast(self.group, self.frame.tensor[: self.frame.size], name=self.name)
        loaded()

    def close(self) -> None:
        pass

    def release(self) -> None:
        self.frame.release()
