"""Moving a policy's device memory to the host and back, for the colocated schedule (the engine holds the device
while the policy waits).

Tensors are moved by *storage*: each distinct storage is copied to a host buffer (pinned when it lives on a GPU)
and resized to 0 bytes, which frees it while every tensor and view on it (Megatron's parameters are views into
its DDP buffers) keeps its identity; ``restore`` resizes it back and copies the bytes in. A storage met twice
moves once. Storages that only need to exist again (gradients: zeroed at the next step) are dropped, not
copied. The same code runs on CPU tensors (a real copy and free), which is how CI checks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass
class HostStash:
    """Storages moved off their device: (storage, its host copy or None when dropped, its size in bytes); and
    tensors whose storage cannot be resized (memory-mapped from a checkpoint, say), whose ``.data`` was swapped
    for an empty tensor instead: (tensor, its host copy)."""

    moved: list[tuple[torch.UntypedStorage, torch.Tensor | None, int]] = field(default_factory=list)
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.moved) + sum(host.nbytes for _, host in self.swapped)

    def restore(self, *, dropped: bool = True) -> None:
        """Every storage back at its size; copied bytes restored exactly, dropped ones zeroed. With
        ``dropped=False`` the dropped storages (gradients) stay off the device, still in this stash."""
        kept = [entry for entry in self.moved if entry[1] is None and not dropped]
        for storage, host, size in self.moved:
            if host is None and not dropped:
                continue
            storage.resize_(size)
            data = _as_bytes(storage)
            if host is None:
                data.zero_()
            else:
                data.copy_(host, non_blocking=host.is_pinned())
        for tensor, host in self.swapped:
            tensor.data = host.to(tensor.device, non_blocking=host.is_pinned())
        if any(s.device.type == "cuda" for s, _, _ in self.moved) or any(t.is_cuda for t, _ in self.swapped):
            torch.cuda.synchronize()
        self.moved[:] = kept
        self.swapped.clear()


def stash(tensors: Iterable[torch.Tensor | None], *, keep: bool = True, into: HostStash | None = None) -> HostStash:
    """Free the storages of ``tensors`` (skipping empty ones and ones already moved into ``into``); with
    ``keep`` their bytes are copied to the host first, else they come back zeroed."""
    out = into if into is not None else HostStash()
    seen = {storage.data_ptr() for storage, _, _ in out.moved}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if size == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        pinned = storage.device.type == "cuda"
        if not storage.resizable():  # swap this tensor's data instead (its identity stays; views of it do not)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned).copy_(tensor.detach())
            out.swapped.append((tensor, host))
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            continue
        host = None
        if keep:
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
            host.copy_(_as_bytes(storage))
        out.moved.append((storage, host, size))
    for storage, _, _ in out.moved:
        storage.resize_(0)
    return out
