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
from mmupt_megatron.engines.parallel import ParallelDims
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec


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


def offer_manifest(engine: Any, manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
    """The engine actor's verdict on a refit manifest: None to go ahead, else its reason."""
    import ray

    return ray.get(engine.check_refit_manifest.remote([entry.to_json() for entry in manifest]))


class RaySender:
    """``WeightSender`` into a ``RolloutWorker`` actor: the manifest is checked by the engine before any
    gather, then each bucket (a safetensors frame) goes through the object store, one at a time."""

    def __init__(self, engine: Any) -> None:
        from mmupt_megatron.engines.weight_transport import SafetensorsBuckets

        self.engine = engine
        self.frames = SafetensorsBuckets()

    def offer(self, manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
        return offer_manifest(self.engine, manifest)

    def buffer(self, layout) -> torch.Tensor:  # noqa: ANN001 - BucketLayout
        return self.frames.buffer(layout)

    def send(self, layout) -> None:  # noqa: ANN001, ARG002
        import ray

        ray.get(self.engine.load_bucket.remote(self.frames.take()))  # the frame itself: no bytes() copy

    def close(self) -> None:
        pass


def ray_shm_sender(engine: Any, *, name_prefix: str) -> Any:
    """A ``ShmSender`` whose notifications go to a ``RolloutWorker`` actor on this host: each bucket is
    written into a reused host shared-memory segment (by every TP rank, ``weight_sync``), and the engine
    maps the segment by name and loads from it; the call returns once the engine is done with it."""
    import ray

    from mmupt_megatron.engines.weight_transport import ShmSender

    class RayShmSender(ShmSender):
        def __init__(self) -> None:
            super().__init__(conn=None, name_prefix=name_prefix)

        def offer(self, manifest) -> str | None:  # noqa: ANN001 - Sequence[ManifestEntry]
            self._next = 0  # as ShmSender.offer: every refit fills the ring from its first slot
            return offer_manifest(engine, manifest)

        def send(self, layout) -> None:  # noqa: ANN001, ARG002 - BucketLayout
            slot, self._current = self._current, None
            ray.get(engine.load_shm_bucket.remote(self._ring[slot].name, self._size))

        def close(self) -> None:
            pass

    return RayShmSender()


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
    ) -> None:
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
        )
        torch.set_num_threads(num_threads)
        from mmupt_megatron.engines.megatron_policy import MegatronPolicy
        from mmupt_megatron.engines.parallel import init_parallel
        from mmupt_megatron.models.convert import build_model
        from mmupt_megatron.models.hf_config import load_arch
        from mmupt_megatron.models.weights import load_hf_weights

        self.model_dir = model_dir
        self._sender: Any = None  # the refit sender (TP rank 0 of DP rank 0), created at the first refit
        self.groups = init_parallel(dims, seed=seed)
        self.arch = load_arch(model_dir)
        dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
        model = build_model(self.arch, self.groups, dtype=dtype)
        load_hf_weights(model, model_dir)
        self.policy = MegatronPolicy(model, self.groups, optim)
        self.reference = None
        if with_reference:
            reference = build_model(self.arch, self.groups, dtype=dtype)
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

    def logprobs(self, batch: PolicyBatch, *, reference: bool = False) -> torch.Tensor | None:
        policy = self.reference if reference else self.policy
        if policy is None:
            raise ValueError("reference log-probs requested but the worker has no reference model (kl_coef = 0)")
        return policy.compute_logprobs(batch)

    def train(self, batch: PolicyBatch, *, global_num_tokens: int, global_num_seqs: int) -> dict[str, float]:
        return self.policy.train_step(batch, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)

    def set_lr(self, lr: float) -> None:
        for group in self.policy.optimizer.param_groups:
            group["lr"] = lr

    def refit(self, engine: Any, *, bucket_bytes: int, transport: str = "auto", shm_prefix: str = "mmupt_") -> int:
        """Stream this rank's stage into the engine actor (collective over the model's ranks): TP rank 0 of
        DP rank 0 sends one bucket of whole layers at a time; the others take part in the TP gathers. Its
        shared-memory segments are named ``shm_prefix...`` and live until ``release_refit``."""
        from mmupt_megatron.engines.weight_sync import send_refit

        g = self.groups
        sender = None
        if g.tp_rank == 0 and g.dp_rank == 0:
            if self._sender is None:  # kept across refits: its shared-memory buffer is reused
                use_shm = self._use_shm(engine, transport)
                self._sender = ray_shm_sender(engine, name_prefix=shm_prefix) if use_shm else RaySender(engine)
            sender = self._sender
        return send_refit(self.policy.model, sender, bucket_bytes=bucket_bytes).num_bytes

    def release_refit(self) -> list[str]:
        """Unlink the refit sender's shared-memory segments (before the actor is killed: a kill runs no
        finalizer); returns their names."""
        from mmupt_megatron.engines.weight_transport import ShmSender

        if not isinstance(self._sender, ShmSender):
            return []
        names = self._sender.segments
        self._sender.release()
        return names

    def refit_transport(self) -> str | None:
        """shm or ray once this rank has sent a refit; None on ranks that do not send."""
        from mmupt_megatron.engines.weight_transport import ShmSender

        return None if self._sender is None else "shm" if isinstance(self._sender, ShmSender) else "ray"

    @staticmethod
    def _use_shm(engine: Any, transport: str) -> bool:
        import ray

        if transport != "auto":
            return transport == "shm"
        same_host = ray.get(engine.node_id.remote()) == ray.get_runtime_context().get_node_id()
        return same_host and os.path.isdir("/dev/shm")

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


class RolloutWorker:
    """A rollout engine in its own process."""

    def __init__(self, *, model_dir: str, engine_kwargs: dict[str, Any], num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)
        from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine

        self.engine = VLLMRolloutEngine(model_dir, **engine_kwargs)
        self._mapped: dict[str, torch.Tensor] = {}  # shared-memory refit segments, mapped once

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
        """Load the bucket frame in the first ``size`` bytes of host shared-memory segment ``name``."""
        from mmupt_megatron.engines.weight_transport import decode_bucket, map_shared_segment

        mapped = self._mapped.get(name)
        if mapped is None or mapped.numel() < size:
            mapped = map_shared_segment(name, self._mapped)
        entries, tensors = decode_bucket(mapped[:size])  # views: load_weights copies them into the model
        return self.engine.load_weights(tensors, manifest=[(e.name, e.shape) for e in entries])

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def load_bucket(self, frame: bytes) -> int:
        from mmupt_megatron.engines.weight_transport import decode_bucket

        entries, tensors = decode_bucket(frame)
        return self.engine.load_weights(tensors, manifest=[(e.name, e.shape) for e in entries])

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def tokenizer_info(self) -> dict[str, int | None]:
        tokenizer = self.engine.tokenizer
        return {"pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}
