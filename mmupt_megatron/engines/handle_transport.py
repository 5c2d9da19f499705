"""Refit buckets shared by tensor handle: the bucket is one tensor on the sender's device, and the engines on
the same device open it through a handle (``vllm_worker.share_tensor``) instead of receiving a copy.

On GPU the handle is a CUDA IPC handle: a colocated engine (same GPU) reads the policy's bucket in place, the
NeMo-RL way. On CPU the bucket lives in shared memory and the handle names its file (torch's ``file_system``
sharing strategy, set here for this process), so CI runs this transport's code end to end.

    sender = HandleSender(offer=check_manifest, notify=lambda handle, size: load_everywhere(handle, size))
    send_refit(model, sender, bucket_bytes=...)    # weight_sync: packs each bucket into sender.buffer(layout)

One bucket tensor, grown to the largest bucket (in 1 MiB steps) and reused; its handle is made once per growth.
``send`` returns when every engine has loaded the bucket (``notify`` blocks), so the next bucket may overwrite it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmupt_megatron.engines.vllm_worker import share_tensor
from mmupt_megatron.engines.weight_transport import BucketLayout, ManifestEntry, _frame_prefix

_GROW = 1 << 20


class HandleSender:
    def __init__(self, *, offer: Callable[[Sequence[ManifestEntry]], str | None],
                 notify: Callable[[bytes, int], None], device: torch.device | str | None = None) -> None:
        self._offer, self._notify = offer, notify
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        if self.device.type == "cpu":
            torch.multiprocessing.set_sharing_strategy("file_system")  # handles that are file names
        self._frame = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._handle = b""
        self._size = 0

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        return self._offer(manifest)

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        prefix = _frame_prefix(layout)
        self._size = len(prefix) + layout.nbytes
        if self._frame.numel() < self._size:
            self._frame = torch.empty(-(-self._size // _GROW) * _GROW, dtype=torch.uint8, device=self.device)
            if self.device.type == "cpu":
                self._frame.share_memory_()
            self._handle = share_tensor(self._frame)
        self._frame[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
        return self._frame[len(prefix) : self._size]

    def send(self, layout: BucketLayout) -> None:  # noqa: ARG002 - the frame names its tensors
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the packing's copies are done before another process reads
        self._notify(self._handle, self._size)

    def close(self) -> None:
        pass

    def release(self) -> None:
        """Drop the bucket tensor (the engines' mappings go with their own references)."""
        self._frame = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._handle = b""
