"""Ray actors: one per Megatron rank (``PolicyWorker``) and one per rollout engine (``RolloutWorker``).

The driver never touches tensors' sharding: it sends each policy worker the full batch's slice for its
data-parallel rank and reads results from the ranks that hold them (the last pipeline stage's TP rank 0).
torch.distributed runs among the policy workers only (gloo on CPU, NCCL on GPU); the engine process has no
torch.distributed world of its own (vLLM's uni-process executor would otherwise try to use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmupt_megatron.engines.megatron_policy import PolicyBatch, PolicyOptimConfig
from mmupt_megatron.engines.micro_batching import MicroBatchLayout
from mmupt_megatron.distributed.parallel import ParallelDims
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.trainer.host_boundary import host_results


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    rank: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    is_last_stage: bool

    @property
    def reports(self) -> bool:
        """The rank whose log-probs / metrics the driver reads for its DP slice."""
        return self.is_last_stage and self.tp_rank == 0


def offer_manifest(engines: list[Any], manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
    """The engine actors' verdict on a refit manifest: None to go ahead, else the first reason given."""
    import ray

    entries = [entry.to_json() for entry in manifest]
    return next((r for r in ray.get([e.check_refit_manifest.remote(entries) for e in engines]) if r), None)


class RaySender:
    """``WeightSender`` into ``RolloutWorker`` actors: the manifest is checked by the engines before any
    gather, then each bucket (a safetensors frame) goes through the object store, once, to every engine."""

    def __init__(self, engines: list[Any]) -> None:
        from mmupt_megatron.engines.weight_transport import SafetensorsBuckets

        self.engines = engines
        self.frames = SafetensorsBuckets()

    def offer(self, manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
        return offer_manifest(self.engines, manifest)

    def buffer(self, layout) -> torch.Tensor:  # noqa: ANN001 - BucketLayout
        return self.frames.buffer(layout)

    def send(self, layout) -> None:  # noqa: ANN001, ARG002
        import ray

        frame = ray.put(self.frames.take())  # the frame itself: no bytes() copy; one object for all engines
        ray.get([engine.load_bucket.remote(frame) for engine in self.engines])

    def close(self) -> None:
        pass


class RayShmSender:
    """Buckets in host shared memory (``ShmBuckets``) that ``RolloutWorker`` actors on this host map by name and
    load from, all at once: each bucket is written into a reused segment named ``name_prefix...`` (by every TP
    rank, ``weight_sync``); ``send`` returns once every engine is done with it."""

    def __init__(self, engines: list[Any], *, name_prefix: str) -> None:
        from mmupt_megatron.engines.weight_transport import ShmBuckets

        self.engines = engines
        self.buckets = ShmBuckets(name_prefix=name_prefix)

    def offer(self, manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
        self.buckets.restart()
        return offer_manifest(self.engines, manifest)

    def buffer(self, layout) -> torch.Tensor:  # noqa: ANN001 - BucketLayout
        return self.buckets.fill(layout)

    def share(self) -> tuple[str, int] | None:
        return self.buckets.share()

    def send(self, layout) -> None:  # noqa: ANN001, ARG002 - BucketLayout
        import ray

        _, name, size = self.buckets.take()
        ray.get([engine.load_shm_bucket.remote(name, size) for engine in self.engines])

    def close(self) -> None:
        pass

    @property
    def segments(self) -> list[str]:
        return self.buckets.segments

    def release(self) -> None:
        self.buckets.release()


def ray_handle_sender(engines: list[Any]) -> Any:
    """A ``HandleSender`` whose buckets ``RolloutWorker`` actors open by handle (CUDA IPC: colocated engines on
    this GPU; CPU: a shared-memory file), all at once; the call returns once all are done with it."""
    import ray

    from mmupt_megatron.engines.device_transport import HandleSender

    def notify(handle: bytes, size: int) -> None:
        ray.get([engine.load_shared_bucket.remote(handle, size) for engine in engines])

    return HandleSender(offer=lambda manifest: offer_manifest(engines, manifest), notify=notify)


def ray_broadcast_sender(engines: list[Any], *, timeout_s: float = 600.0) -> Any:
    """A ``BroadcastSender`` to ``RolloutWorker`` actors anywhere: each bucket is broadcast from this rank's device
    to every engine worker over a refit group of its own (NCCL on GPU, gloo on CPU). The cluster never lets two
    such senders that share an engine refit at once (``refit_routes.refit_waves``): an engine actor runs one task
    at a time, so two groups spanning the same engines could each hold one of them and wait for the other."""
    import ray

    from mmupt_megatron.engines.device_transport import BroadcastSender

    sizes = ray.get([engine.num_workers.remote() for engine in engines])
    firsts = [1 + sum(sizes[:i]) for i in range(len(engines))]

    group_key: list[str] = []  # the group's rendezvous (host:port): an engine refit by several senders (one per
    # pipeline stage) belongs to one refit group per sender

    def join(host: str, port: int, world: int):  # noqa: ANN202 - a wait function
        group_key[:] = [f"{host}:{port}"]
        refs = [e.join_refit_broadcast.remote(host, port, first, world, timeout_s) for e, first in zip(engines, firsts)]
        return lambda: ray.get(refs)

    def receive(size: int):  # noqa: ANN202 - a wait function
        refs = [engine.load_broadcast_bucket.remote(size, group_key[0]) for engine in engines]
        return lambda: ray.get(refs)

    return BroadcastSender(offer=lambda manifest: offer_manifest(engines, manifest), workers=sum(sizes), join=join,
                           receive=receive, host=ray.util.get_node_ip_address(), timeout_s=timeout_s)


def ray_local_device() -> int:
    """This actor's GPU as an index among the devices it sees (Ray narrows CUDA_VISIBLE_DEVICES to the GPUs
    it assigned, so usually 0); 0 without a GPU or outside Ray."""
    import ray

    if not ray.is_initialized():
        return 0
    assigned = [str(i) for i in ray.get_gpu_ids()]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if not assigned or not visible:
        return 0
    return visible.index(assigned[0]) if assigned[0] in visible else 0


def actor_location() -> tuple[str, tuple[str, ...]]:
    """(Ray node id, the GPU ids Ray assigned the calling actor): ``engines/refit_routes.py``'s location."""
    import ray

    return ray.get_runtime_context().get_node_id(), tuple(str(i) for i in ray.get_gpu_ids())


@host_results  # every result reaches the driver in host memory
class PolicyWorker:
    """One Megatron rank: the trained policy and, when KL is on, a frozen reference copy."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        dims: ParallelDims,
        model_dir: str,
        optim: PolicyOptimConfig,
        with_reference: bool,
        seed: int,
        num_threads: int = 1,
        local_rank: int | None = None,
        backend: str | None = None,
        model_options: dict[str, Any] | None = None,
    ) -> None:
        """``local_rank``: the device index in this process (default: the GPU Ray assigned this actor);
        ``backend``: torch.distributed's (default: ``init_parallel``'s choice for the device);
        ``model_options``: ``build_model``'s fp8 / fp8_recipe / recompute / sequence_parallel / deterministic (with
        ``deterministic``, torch's deterministic algorithms too: ``distributed/determinism.py``)."""
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(ray_local_device() if local_rank is None else local_rank),
        )
        torch.set_num_threads(num_threads)
        if (model_options or {}).get("deterministic"):
            from mmupt_megatron.distributed.determinism import make_deterministic

            make_deterministic()
        from mmupt_megatron.engines.megatron_policy import MegatronPolicy
        from mmupt_megatron.distributed.parallel import init_parallel
        from mmupt_megatron.models.convert import build_model
        from mmupt_megatron.models.hf_config import load_arch
        from mmupt_megatron.models.weights import load_hf_weights

        self.model_dir = model_dir
        self._sender: Any = None  # the refit sender (TP rank 0 of a replica that refits), made at the first refit
        self.groups = init_parallel(dims, seed=seed, backend=backend)
        self.arch = load_arch(model_dir)
        dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
        model = build_model(self.arch, self.groups, dtype=dtype, **(model_options or {}))
        load_hf_weights(model, model_dir)
        self.policy = MegatronPolicy(model, self.groups, optim)
        self.reference = None
        if with_reference:
            reference = build_model(self.arch, self.groups, dtype=dtype, **(model_options or {}))
            load_hf_weights(reference, model_dir)
            reference.requires_grad_(False)
            # forward-only: plain SGD with lr 0 keeps its optimizer stateless
            self.reference = MegatronPolicy(reference, self.groups, replace(optim, optimizer="sgd", lr=0.0))

    def info(self) -> RankInfo:
        g = self.groups
        return RankInfo(rank=g.rank, dp_rank=g.dp_rank, tp_rank=g.tp_rank, pp_rank=g.pp_rank,
                        is_last_stage=g.is_last_stage)

    def image_token_id(self) -> int | None:
        return self.arch.image_token_id

    def param_dtype(self) -> torch.dtype:
        """The policy's parameter dtype (fp32 on CPU, bf16 on GPU): ``rollout.verify_refit_tol``'s default."""
        return next(self.policy.model.parameters()).dtype

    def device_location(self) -> tuple[str, tuple[str, ...]]:
        """Where this rank runs (a refit sender's location, ``engines/refit_routes.py``)."""
        return actor_location()

    def micro_batch_layout(self) -> MicroBatchLayout:
        """How the policy cuts a DP rank's sequences into micro-batches (fixed, bucketed or packed; padding)."""
        return self.policy.layout

    def logprobs(self, batch: PolicyBatch, *, reference: bool = False,
                 temperature: float | None = None) -> torch.Tensor | None:
        """Log-probs at the sampling temperature (the policy's config), or at ``temperature``."""
        policy = self.reference if reference else self.policy
        if policy is None:
            raise ValueError("reference log-probs requested but the worker has no reference model (kl_coef = 0)")
        return policy.compute_logprobs(batch, temperature=temperature)

    def train(self, batch: PolicyBatch, *, global_num_tokens: float, global_num_seqs: float) -> dict[str, float]:
        return self.policy.train_step(batch, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)

    # -- device memory (trainer/schedule.py) ------------------------------------------------------------
    def offload(self) -> int:
        """Gradients, optimizer state and the reference model off the device; weights stay (refit reads them)."""
        moved = self.policy.offload()
        if self.reference is not None:
            moved += self.reference.offload(weights=True)
        _empty_cache()
        return moved

    def onload(self, grads: bool = True) -> None:
        """Gradients and optimizer state back (the reference stays off until ``onload_reference``); without
        ``grads`` the optimizer state only (a checkpoint's save or load)."""
        self.policy.onload(grads=grads)

    def onload_reference(self) -> None:
        if self.reference is not None:
            self.reference.onload()

    def offload_reference(self) -> None:
        if self.reference is not None:
            self.reference.offload(weights=True)
            _empty_cache()

    def refit(self, routes: list[tuple[str, list[Any]]], *, bucket_bytes: int, shm_prefix: str = "mmupt_",
              timeout_s: float = 600.0) -> int:
        """Stream this rank's stage into the engine actors this rank's DP replica refits: ``routes`` = (transport,
        engines) per transport its stage's sender uses (``engines/refit_routes.refit_transports``; the same on
        every rank of the replica; empty when it refits none). Collective over the replica's TP group: TP rank 0
        sends one bucket of whole layers at a time, the others take part in the gathers. Its shared-memory segments
        (transport shm) are named ``shm_prefix...`` and live until ``release_refit``. The engines a rank serves stay
        the same for the cluster's life. ``timeout_s``: the broadcast transport's rendezvous and broadcasts
        (``rollout.refit_timeout_s``)."""
        from mmupt_megatron.engines.weight_sync import send_refit

        sender = None
        if self.groups.tp_rank == 0 and routes:
            if self._sender is None:  # kept across refits: its bucket buffer is reused
                self._sender = self._make_sender(routes, shm_prefix=shm_prefix, timeout_s=timeout_s)
            sender = self._sender
        return send_refit(self.policy.model, sender, bucket_bytes=bucket_bytes, active=bool(routes)).num_bytes

    def release_refit(self) -> list[str]:
        """Release the refit sender's buffers: unlink its shared-memory segments (before the actor is killed: a
        kill runs no finalizer), drop its bucket tensor; returns the segments' names."""
        names = list(getattr(self._sender, "segments", []))
        if self._sender is not None and hasattr(self._sender, "release"):
            self._sender.release()
        return names

    def refit_transport(self) -> str | None:
        """ipc, shm, broadcast or ray once this rank has sent a refit (several joined by ``+`` when its engines
        need several, e.g. ``shm+broadcast``); None on ranks that do not send."""
        from mmupt_megatron.engines.device_transport import BroadcastSender, HandleSender
        from mmupt_megatron.engines.weight_transport import FanoutSender

        kinds = {HandleSender: "ipc", RayShmSender: "shm", BroadcastSender: "broadcast"}
        if self._sender is None:
            return None
        senders = self._sender.senders if isinstance(self._sender, FanoutSender) else [self._sender]
        return "+".join(next((kind for cls, kind in kinds.items() if isinstance(s, cls)), "ray") for s in senders)

    @staticmethod
    def _make_sender(routes: list[tuple[str, list[Any]]], *, shm_prefix: str, timeout_s: float) -> Any:
        """One sender per (transport, engines) route (resolved by the cluster: ``engines/refit_routes``): ipc
        (bucket shared by tensor handle), shm (host shared memory), broadcast (a refit process group), ray (object
        store); several behind one ``FanoutSender``, the shared-memory one first (its TP peers write in place)."""
        from mmupt_megatron.engines.weight_transport import FanoutSender

        def make(transport: str, engines: list[Any]) -> Any:
            if transport == "shm":
                return RayShmSender(engines, name_prefix=shm_prefix)
            if transport == "broadcast":
                return ray_broadcast_sender(engines, timeout_s=timeout_s)
            return {"ipc": ray_handle_sender, "ray": RaySender}[transport](engines)

        senders = [make(t, e) for t, e in sorted(routes, key=lambda route: route[0] != "shm")]
        return senders[0] if len(senders) == 1 else FanoutSender(senders)

    def save(self, folder: str) -> None:
        """Collective: the policy and the optimizer's state (Adam moments, fp32 main params: every rank's
        shard), each a dist-checkpoint that loads at another layout."""
        from mmupt_megatron.models.convert import save_megatron_checkpoint
        from mmupt_megatron.trainer.optim_checkpoint import save_optimizer

        save_megatron_checkpoint(self.policy.model, Path(folder) / "policy", hf_meta_dir=self.model_dir)
        save_optimizer(self.policy, Path(folder) / "optimizer")

    def load(self, folder: str) -> None:
        """Collective: restore what ``save`` wrote. Nothing in it is unpickled freely (``safe_files``)."""
        from mmupt_megatron.models.convert import load_megatron_checkpoint
        from mmupt_megatron.trainer.optim_checkpoint import load_optimizer

        load_megatron_checkpoint(self.policy.model, Path(folder) / "policy")
        load_optimizer(self.policy, Path(folder) / "optimizer")

    def export_hf(self, out_dir: str) -> None:
        from mmupt_megatron.models.weights import export_hf_weights

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        export_hf_weights(self.policy.model, out_dir)


@host_results
class RolloutWorker:
    """A rollout engine in its own process."""

    def __init__(self, *, model_dir: str, engine_kwargs: dict[str, Any], num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)
        from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine

        self.engine = VLLMRolloutEngine(model_dir, **engine_kwargs)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingSpec) -> list[Rollout]:
        return self.engine.generate(requests, sampling)

    def prompt_logprobs(self, requests: list[RolloutRequest], completions: list[list[int]]) -> list[torch.Tensor]:
        return self.engine.prompt_logprobs(requests, completions)

    def check_refit_manifest(self, entries: list[list]) -> str | None:
        """None if this stage's manifest is loadable, else the reason (names the tensor)."""
        from mmupt_megatron.engines.weight_sync import check_refit_manifest
        from mmupt_megatron.engines.weight_transport import ManifestEntry

        try:
            check_refit_manifest(self.engine, [ManifestEntry.from_json(e) for e in entries], complete=False)
        except ValueError as error:
            return str(error)
        return None

    def load_shm_bucket(self, name: str, size: int) -> int:
        """Load the bucket frame in the first ``size`` bytes of host shared-memory segment ``name`` (the engine's
        workers map it themselves)."""
        return self.engine.load_bucket("mmupt_load_shm", name, size)

    def device_location(self) -> tuple[str, tuple[str, ...]]:
        """(Ray node id, the GPU ids Ray assigned this actor) — where the engine's memory is."""
        return actor_location()

    def num_workers(self) -> int:
        """vLLM workers of this engine (its tensor-parallel degree): each joins a refit broadcast group."""
        return self.engine.tensor_parallel_size

    def join_refit_broadcast(self, host: str, port: int, first_rank: int, world: int, timeout_s: float = 600.0) -> None:
        """Join the refit group whose rendezvous is ``host:port`` (one per sender)."""
        self.engine.llm.collective_rpc("mmupt_join_broadcast", args=(host, port, first_rank, world, timeout_s))

    def load_broadcast_bucket(self, size: int, group: str) -> int:
        """Take part in the next broadcast of refit group ``group`` (``host:port``: a ``size``-byte bucket frame)
        and load it."""
        return self.engine.load_bucket("mmupt_load_broadcast", size, group)

    def load_shared_bucket(self, handle: bytes, size: int) -> int:
        """Load the bucket frame in the first ``size`` bytes of the tensor behind ``handle`` (``share_tensor``)."""
        return self.engine.load_bucket("mmupt_load_shared", handle, size)

    def load_bucket(self, frame: bytes) -> int:
        return self.engine.load_bucket("mmupt_load_frame", bytes(frame))

    def sleep(self) -> None:
        self.engine.sleep()
        _empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def tokenizer_info(self) -> dict[str, int | None]:
        tokenizer = self.engine.tokenizer
        return {"pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}


def _empty_cache() -> None:
    """Return freed blocks to the device (GPU) so the other side of the schedule can take them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
