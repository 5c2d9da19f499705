"""Parallel layout and process groups: the only module that touches ``megatron.core.parallel_state``.

``init_parallel`` starts torch.distributed (gloo on CPU; on GPU NCCL for device tensors and gloo for host ones) and Megatron's model-parallel
state, and returns a ``ParallelGroups`` that the rest of the code receives as an argument. ``run_workers``
spawns N local worker processes on a free port (CPU tests, checkpoint conversion) and returns what
each rank's function returned.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmupt_megatron.distributed.cpu_compat import apply_cpu_compat


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    tp: int = 1
    """Tensor-parallel degree: splits attention heads, KV heads, MLP and vocabulary."""
    pp: int = 1
    """Pipeline-parallel degree: splits the decoder layers into contiguous stages."""
    dp: int = 1
    """Data-parallel degree: replicas that each see a slice of the batch."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def validate(self, *, world_size: int, num_attention_heads: int, num_kv_heads: int, num_layers: int) -> None:
        """Raise ValueError naming every degree that does not fit the world size or the model."""
        problems = []
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not problems:
            if num_attention_heads % self.tp:
                problems.append(f"tp={self.tp} does not divide num_attention_heads={num_attention_heads}")
            if num_kv_heads % self.tp:
                problems.append(f"tp={self.tp} does not divide num_key_value_heads={num_kv_heads}")
            if num_layers % self.pp:
                problems.append(f"pp={self.pp} does not divide num_hidden_layers={num_layers}")
            if self.world_size != world_size:
                problems.append(
                    f"tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {self.world_size} != world_size={world_size}"
                )
        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))


@dataclass(kw_only=True, frozen=True)
class ParallelGroups:
    """The process groups of this rank and its coordinates in them."""

    dims: ParallelDims
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    pp_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, first stage first."""
    megatron_pgs: Any
    """megatron.core.process_groups_config.ProcessGroupCollection for megatron modules."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def init_parallel(dims: ParallelDims, *, seed: int = 1234, backend: str | None = None) -> ParallelGroups:
    """Initialise torch.distributed (from the env:// variables) and Megatron's model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    apply_cpu_compat()
    if not dist.is_initialized():
        # on GPU both: device tensors through NCCL, host tensors (flags, object broadcasts, host buffers)
        # through gloo; every group Megatron creates inherits the pair
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    world_size = dist.get_world_size()
    if dims.world_size != world_size:
        raise ValueError(f"tp*pp*dp = {dims.world_size} != world_size={world_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
    )
    model_parallel_cuda_manual_seed(seed)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    return ParallelGroups(
        dims=dims,
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=pp_group,
        dp_group=parallel_state.get_data_parallel_group(),
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)),
        megatron_pgs=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (for tests that re-initialise)."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        parallel_state = sys.modules["megatron.core.parallel_state"]
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        destroy_parallel()


def run_workers(fn: Callable[..., Any], *, world_size: int, args: tuple = (), timeout_s: float = 600) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned processes (env:// rendezvous on a free local port).

    ``fn`` must be importable (module level); it calls ``init_parallel`` itself. Returns the per-rank
    return values (serialised with torch.save); raises RuntimeError with the first failing traceback.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker_entry, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            errors.append(f"timed out after {timeout_s} s")
            break
        if queue.empty():
            if errors or any(p.exitcode not in (None, 0) for p in procs):
                dead = [p.exitcode for p in procs]
                if not queue.empty():
                    continue
                errors.append(f"worker exited without a result (exit codes {dead})")
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            # our own child's return value (any object: weights_only would refuse it), never a file a user gave
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for proc in procs:
        proc.join(timeout=5 if errors else 60)
        if proc.is_alive():
            proc.kill()
    if errors:
        raise RuntimeError("worker failure: " + errors[0])
    return [results[rank] for rank in range(world_size)]
