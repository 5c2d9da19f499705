"""Refit inside vLLM's worker processes: a ``worker_extension_cls`` whose methods vLLM mixes into each worker,
reached with ``LLM.collective_rpc(method, args=...)``. Every argument is plain data (a segment name, bytes), so
the same call works with the engine core in-process (CPU tests' fast start) and in its own process (vLLM's
default, and the only way on GPU), and for tensor-parallel engines (every worker loads the full tensors and
keeps its shard).

A bucket is one frame of ``weight_transport.encode``'s layout (a safetensors header naming every tensor, then
the data), found
- in host shared memory (``mmupt_load_shm``: the worker maps ``/dev/shm/<name>``; the trainer's TP ranks wrote
  their pieces there),
- in the call itself (``mmupt_load_frame``: the frame's bytes, e.g. from Ray's object store), or
- behind a tensor handle (``mmupt_load_shared``: what ``torch.multiprocessing.reductions.reduce_tensor`` made of
  the sender's bucket tensor, pickled: a CUDA IPC handle for a GPU tensor on this device, a shared-memory file
  for a CPU tensor; the receiver maps it without a copy).
Each method loads through the worker's in-place ``reload_weights`` (which re-runs vLLM's post-load processing)
and returns the number of tensors loaded. The caller resets the engine's prefix and encoder caches.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import torch

EXTENSION = "mmupt_megatron.engines.vllm_worker.RefitExtension"


def share_tensor(tensor: torch.Tensor) -> bytes:
    """A handle to ``tensor`` another process on this host can open (``mmupt_load_shared``): CUDA IPC on GPU; on
    CPU the tensor must be in shared memory (``share_memory_()``) and torch's ``file_system`` sharing strategy
    must be on (``torch.multiprocessing.set_sharing_strategy``), so the handle is a file name, not a descriptor."""
    from torch.multiprocessing.reductions import reduce_tensor

    if tensor.device.type == "cpu" and not tensor.is_shared():
        raise ValueError("share_tensor: a CPU tensor must be in shared memory (call share_memory_() first)")
    return pickle.dumps(reduce_tensor(tensor))


def open_shared(handle: bytes) -> torch.Tensor:
    """The tensor behind a ``share_tensor`` handle (our own trainer's, on this host)."""
    rebuild, args = pickle.loads(handle)  # noqa: S301 - made by share_tensor in the trainer, never user data
    return rebuild(*args)


class RefitExtension:
    """Mixed into vLLM's worker class (``self`` is the worker)."""

    _mapped: dict[str, torch.Tensor]

    def _reload(self, frame: Any) -> int:
        from mmupt_megatron.engines.weight_transport import decode_bucket

        entries, tensors = decode_bucket(frame)
        self.reload_weights(weights_iterator=iter(tensors))  # type: ignore[attr-defined]
        return len(entries)

    def mmupt_load_shm(self, name: str, size: int) -> int:
        from mmupt_megatron.engines.weight_transport import map_shared_segment

        if not hasattr(self, "_mapped"):
            self._mapped = {}
        mapped = self._mapped.get(name)
        if mapped is None or mapped.numel() < size:
            mapped = map_shared_segment(name, self._mapped)
        return self._reload(mapped[:size])

    def mmupt_load_frame(self, frame: bytes) -> int:
        with warnings.catch_warnings():  # read-only bytes: the tensors are only read
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return self._reload(frame)

    def mmupt_load_shared(self, handle: bytes, size: int) -> int:
        return self._reload(open_shared(handle)[:size])
