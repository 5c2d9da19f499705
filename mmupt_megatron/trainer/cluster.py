"""Ray set-up and fan-out: the Megatron workers as one ``PolicyGroup``, the engine as one actor.

Placement: one placement group with a bundle per Megatron rank (PACK strategy, so a single node is used
when it fits; on GPU clusters each bundle also takes its GPU). Colocated (``trainer.colocate``, the
default) the engine shares rank 0's bundle and sleeps while the policy trains; otherwise it gets one more
bundle of its own. Locally Ray starts
with ``ray.init(num_cpus=...)``; with ``trainer.ray_address`` set it attaches to that cluster.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from mmupt_megatron.config import Config
from mmupt_megatron.engines.megatron_policy import PolicyBatch, PolicyOptimConfig
from mmupt_megatron.engines.parallel import ParallelDims
from mmupt_megatron.trainer.batching import shard_for_rank
from mmupt_megatron.trainer.workers import PolicyWorker, RankInfo, RolloutWorker


def connect_ray(address: str, **kwargs: Any) -> None:
    """``ray.init(address=...)`` of a cluster started by ``ray start``, with the authentication it chose.

    Ray 2.60's ``ray start --head`` turns token authentication on when a token exists (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, but ``ray.init`` with an
    explicit address never does, and then waits out its timeout on "InvalidAuthToken". Make the same choice."""
    import ray

    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        pass
    else:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=address, **kwargs)


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.trainer.ray_address:
        connect_ray(cfg.trainer.ray_address, log_to_driver=True)
        return
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.logging.quiet_engines:
        env.update(VLLM_LOGGING_LEVEL="ERROR", TQDM_DISABLE="1")
    # A local run gets its own Ray (address="local": never a cluster an earlier `ray start` left behind) that
    # listens on loopback only: Ray 2.60 binds its servers to 127.0.0.1 when it runs "without clusters".
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",
        num_cpus=cfg.trainer.num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=not cfg.logging.quiet_engines,
        runtime_env={"env_vars": env},
    )


def _node_address() -> tuple[str, int]:
    """This node's IP (as Ray sees it) and a free TCP port on it."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def policy_optim_config(cfg: Config) -> PolicyOptimConfig:
    return PolicyOptimConfig(
        lr=cfg.trainer.lr,
        weight_decay=cfg.trainer.weight_decay,
        clip_grad=cfg.trainer.grad_clip,
        micro_batch_size=cfg.trainer.micro_batch_size,
        freeze_vision=cfg.model.freeze_vision,
        loss=cfg.algorithm.policy_loss(default_norm_length=cfg.rollout.max_new_tokens),
    )


class Cluster:
    """The policy workers (TP x PP x DP ranks) and the rollout engine, placed by one placement group."""

    def __init__(self, cfg: Config, *, model_dir: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        start_ray(cfg)
        p = cfg.parallel
        self.dims = ParallelDims(tp=p.tensor_parallel_size, pp=p.pipeline_parallel_size, dp=p.data_parallel_size)
        world = self.dims.tp * self.dims.pp * self.dims.dp
        on_gpu = torch.cuda.is_available()
        self.colocated = cfg.trainer.colocate
        if self.colocated and cfg.rollout.tensor_parallel_size > 1:
            raise ValueError("trainer.colocate=true places the engine on rank 0's device, so it needs "
                             f"rollout.tensor_parallel_size=1 (got {cfg.rollout.tensor_parallel_size}); "
                             "set trainer.colocate=false to give a tensor-parallel engine devices of its own")
        bundles = world if self.colocated else world + 1
        share = 1.0 if on_gpu else max(0.02, (cfg.trainer.num_cpus or os.cpu_count() or 1) / bundles)
        bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": share}
        self.placement = placement_group([bundle] * bundles, strategy="PACK")
        ray.get(self.placement.ready())

        def on(index: int, fraction: float = 1.0) -> dict[str, Any]:
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.placement, placement_group_bundle_index=index)
            return {"scheduling_strategy": strategy, "num_cpus": bundle["CPU"] * fraction,
                    "num_gpus": bundle.get("GPU", 0) * fraction}

        # colocated: rank 0 and the engine split bundle 0 (the same GPU, or the same CPUs); else the engine
        # takes the extra last bundle
        engine_slot = (0, 0.5) if self.colocated else (world, 1.0)

        optim = policy_optim_config(cfg)
        # torch.distributed rendezvous on rank 0's node (not the driver's: on a cluster they differ)
        master_addr, port = ray.get(ray.remote(_node_address).options(**on(0)).remote())
        Actor = ray.remote(PolicyWorker)
        self.workers = [
            Actor.options(**on(rank, 0.5 if self.colocated and rank == 0 else 1.0)).remote(
                rank=rank, world_size=world, master_addr=master_addr, master_port=port, dims=self.dims,
                model_dir=model_dir, optim=optim, with_reference=cfg.algorithm.kl_coef > 0, seed=cfg.trainer.seed,
            )
            for rank in range(world)
        ]
        self.infos: list[RankInfo] = ray.get([w.info.remote() for w in self.workers])
        from mmupt_megatron.engines.vllm_rollout import engine_kwargs  # here: importing it installs CPU shims

        self.engine = ray.remote(RolloutWorker).options(**on(*engine_slot)).remote(
            model_dir=model_dir, engine_kwargs=engine_kwargs(cfg.rollout))
        self.tokens = ray.get(self.engine.tokenizer_info.remote())
        self.bucket_bytes = cfg.rollout.refit_bucket_mib << 20
        self.refit_transport = cfg.rollout.refit_transport
        self.image_token_id = ray.get(self.workers[0].image_token_id.remote())

    # -- fan-out over data-parallel slices -----------------------------------------------------------
    def _per_rank(self, batch: PolicyBatch) -> list[PolicyBatch]:
        return [
            shard_for_rank(batch, dp_rank=info.dp_rank, dp_size=self.dims.dp, image_token_id=self.image_token_id)
            for info in self.infos
        ]

    def _gather(self, results: list[Any]) -> list[Any]:
        """The reporting rank's result for each DP rank, in DP order."""
        by_dp = {info.dp_rank: result for info, result in zip(self.infos, results, strict=True) if info.reports}
        return [by_dp[d] for d in range(self.dims.dp)]

    def logprobs(self, batch: PolicyBatch, *, reference: bool = False) -> torch.Tensor:
        import ray

        shards = self._per_rank(batch)
        results = ray.get([w.logprobs.remote(s, reference=reference) for w, s in zip(self.workers, shards)])
        return torch.cat(self._gather(results), dim=0)

    def train(self, batch: PolicyBatch) -> dict[str, float]:
        import ray

        shards = self._per_rank(batch)
        num_tokens, num_seqs = int(batch.loss_mask_BT.sum()), batch.input_ids_BT.shape[0]
        results = ray.get([
            w.train.remote(s, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
            for w, s in zip(self.workers, shards)
        ])
        per_dp = self._gather(results)
        merged = {key: sum(r[key] for r in per_dp) / len(per_dp) for key in per_dp[0] if key not in ("loss",)}
        merged["loss"] = sum(r["loss"] for r in per_dp)
        return merged

    def release_engine(self) -> None:
        """Colocated: put the engine to sleep (weights and KV cache off the device) while the policy trains."""
        import ray

        if self.colocated:
            ray.get(self.engine.sleep.remote())

    def refit(self) -> int:
        """Stream the policy's weights into the engine in buckets of whole layers; returns bytes sent.
        Colocated: wakes the engine first."""
        import ray

        if self.colocated:
            ray.get(self.engine.wake_up.remote())
        sent = ray.get([w.refit.remote(self.engine, bucket_bytes=self.bucket_bytes, transport=self.refit_transport)
                        for w in self.workers])
        return sum(sent)

    def save(self, folder: str) -> None:
        import ray

        ray.get([w.save.remote(folder) for w in self.workers])

    def load(self, folder: str) -> None:
        import ray

        ray.get([w.load.remote(folder) for w in self.workers])

    def export_hf(self, out_dir: str) -> None:
        import ray

        ray.get([w.export_hf.remote(out_dir) for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for actor in [*self.workers, self.engine]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement)
