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
  for a CPU tensor; the receiver maps it without a copy), or
- in a broadcast over a refit group of the sender's (``mmupt_join_broadcast`` once per sender, then
  ``mmupt_load_broadcast`` per bucket naming the group: NCCL between GPUs and nodes, gloo on CPU).
Each method loads through the worker's in-place ``reload_weights`` (which re-runs vLLM's post-load processing)
and returns the number of tensors loaded. The caller resets the engine's prefix and encoder caches.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

EXTENSION = "mmupt_megatron.engines.vllm_worker.RefitExtension"
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@contextmanager
def quiet_partial_reload() -> Iterator[None]:
    """vLLM's in-place reload warns "Failed to load weights" for every layer a bucket leaves as it is (a refit sends
    a few layers at a time): silenced meanwhile, wherever the reload runs (an engine worker's own process too)."""
    quiet = logging.getLogger(RELOAD_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def share_tensor(tensor: torch.Tensor) -> bytes:
    """A handle to ``tensor`` another process on this host can open (``mmupt_load_shared``): CUDA IPC on GPU; on
    CPU the tensor must be in shared memory (``share_memory_()``) and torch's ``file_system`` sharing strategy
    must be on (``torch.multiprocessing.set_sharing_strategy``), so the handle is a file name, not a descriptor."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's tensor and storage reductions with ForkingPickler

    if tensor.device.type == "cpu" and not tensor.is_shared():
        raise ValueError("share_tensor: a CPU tensor must be in shared memory (call share_memory_() first)")
    # ForkingPickler, not pickle: torch's reductions turn the storage into a handle (plain pickle would copy it)
    return bytes(ForkingPickler.dumps(tensor))


def refit_group(host: str, port: int, rank: int, world: int, device: torch.device, *, timeout_s: float = 600.0) -> Any:
    """A process group of its own for refit broadcasts (not torch.distributed's default group: vLLM and the
    trainer have theirs): NCCL between GPUs, gloo on CPU; rank 0 (the sender) hosts the rendezvous store.
    Every member must arrive within ``timeout_s`` (``rollout.refit_timeout_s``), else TimeoutError naming the
    group and the members it waited for; each later broadcast has the same limit."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(store, rank, world, options)
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    except (RuntimeError, dist.DistError) as error:  # DistStoreError / gloo's connectFullMesh timeout
        raise TimeoutError(
            f"refit group {host}:{port}: rank {rank} waited {timeout_s:g} s (rollout.refit_timeout_s) for the "
            f"group's {world} members (the sender and every engine worker) to join, and they did not: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def broadcast(group: Any, tensor: torch.Tensor, *, root: int = 0, name: str = "") -> None:
    """Broadcast ``tensor`` from ``root`` over ``group``; a member missing past the group's timeout is a
    TimeoutError naming the group (``name``: its ``host:port``)."""
    options = dist.BroadcastOptions()
    options.rootRank = root
    try:
        group.broadcast([tensor], options).wait()
    except (RuntimeError, dist.DistError) as error:
        raise TimeoutError(f"refit group {name or '?'}: a {tensor.numel()}-byte bucket broadcast from rank {root} "
                           f"did not complete (a member did not take part within rollout.refit_timeout_s): "
                           f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def open_shared(handle: bytes) -> torch.Tensor:
    """The tensor behind a ``share_tensor`` handle (our own trainer's, on this host)."""
    return pickle.loads(handle)  # noqa: S301 - made by share_tensor in the trainer, never user data


class RefitExtension:
    """Mixed into vLLM's worker class (``self`` is the worker)."""

    _mapped: dict[str, torch.Tensor]

    def _reload(self, frame: Any) -> int:
        from mmupt_megatron.engines.weight_transport import decode_bucket

        entries, tensors = decode_bucket(frame)
        with quiet_partial_reload():
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

    def mmupt_join_broadcast(self, host: str, port: int, first_rank: int, world: int, timeout_s: float = 600.0) -> None:
        """Join the refit group of the sender at ``host:port`` as rank ``first_rank`` + this worker's rank in its
        engine. A worker belongs to one group per sender (each pipeline stage of the policy sends its own layers)."""
        if not hasattr(self, "_refit_groups"):
            self._refit_groups: dict[str, Any] = {}
        self._refit_groups[f"{host}:{port}"] = refit_group(host, port, first_rank + self.rank, world,  # type: ignore[attr-defined]
                                                           self.device, timeout_s=timeout_s)  # type: ignore[attr-defined]

    def mmupt_load_broadcast(self, size: int, group: str) -> int:
        """Receive the next ``size``-byte bucket frame broadcast in refit group ``group`` (``host:port``), and
        load it."""
        frame = torch.empty(size, dtype=torch.uint8, device=self.device)  # type: ignore[attr-defined]
        broadcast(self._refit_groups[group], frame, name=group)
        return self._reload(frame)

    def mmupt_load_shared(self, handle: bytes, size: int) -> int:
        return self._reload(open_shared(handle)[:size])
