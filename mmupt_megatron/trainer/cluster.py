"""Ray set-up and fan-out: the Megatron workers as one policy, N rollout engines, and the memory schedule
between them. The only module of the trainer that calls Ray (``workers.py`` holds the actor classes).

Placement: one placement group, one bundle per device: the policy's TP x PP x DP ranks, plus (not colocated)
``rollout.tensor_parallel_size`` bundles per engine. Bundles are ordered by node, then GPU, and rank r takes
the r-th, so a tensor-parallel group never straddles nodes. Colocated (``trainer.colocate``, the default),
engine e shares the bundles of policy ranks e*T .. e*T+T-1 (T = rollout.tensor_parallel_size; half a device
each) and the two take turns (``trainer/schedule.py``). A placement that cannot be satisfied within
``trainer.placement_timeout_s`` is an error naming what was asked and what the cluster has. Locally Ray starts
with ``ray.init(num_cpus=...)``; with ``trainer.ray_address`` set it attaches to that cluster.

Rollout: ``generate`` splits a batch into contiguous runs of whole prompt groups, balanced by expected tokens,
one per engine (``engines/dispatch.py``); seeds follow each request's position in the batch, so the responses
do not depend on the number of engines. Refit: each engine takes every bucket from one data-parallel replica of the
policy, the closest (on its GPU, else its node: ``engines/refit_routes.py``); replicas refit their engines at once,
except that two senders broadcasting to a shared engine take turns (``refit_routes.refit_waves``: an engine runs one
task at a time, and two refit groups that each held one engine would wait for each other forever).

A node lost mid-run (its raylet gone: Ray reports it dead, or it does not answer) turns the Ray error of the call
that met it into ``NodeLostError``, whose one line names the node (host name and address) and the ranks and
engines that ran there; Ray's own error names only an actor id.
"""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import nullcontext
from typing import Any

import torch

from mmupt_megatron.config import Config
from mmupt_megatron.distributed.determinism import deterministic_env
from mmupt_megatron.distributed.parallel import ParallelDims
from mmupt_megatron.engines.dispatch import dispatch, merge
from mmupt_megatron.engines.megatron_policy import PolicyBatch, PolicyOptimConfig
from mmupt_megatron.engines.refit_routes import refit_sources, refit_transports, refit_waves
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.engines.weight_transport import SEGMENT_PREFIX, sweep_segments
from mmupt_megatron.trainer.batching import BatchTraffic, loss_normalisers, pad_for_ranks, shard_for_rank
from mmupt_megatron.trainer.host_boundary import assert_on_host
from mmupt_megatron.trainer.metrics_log import combine_metrics
from mmupt_megatron.trainer.schedule import MemorySchedule
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


def _answers(address: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at ``address:port`` within ``timeout_s``."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class NodeLostError(RuntimeError):
    """A Ray node that ran some of the cluster's actors is gone (one line: the node, what ran there, the cause)."""


def _bundle_location() -> tuple[str, tuple[int, ...]]:
    """(node IP, GPU ids) of the bundle this task runs in."""
    import ray

    return ray.util.get_node_ip_address(), tuple(int(i) for i in ray.get_gpu_ids())


def policy_optim_config(cfg: Config) -> PolicyOptimConfig:
    return PolicyOptimConfig(
        lr=cfg.trainer.lr,
        lr_schedule=cfg.trainer.lr_schedule,
        warmup_updates=cfg.trainer.warmup_steps,
        total_updates=cfg.total_updates(),
        min_lr=cfg.trainer.min_lr,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
        grad_reduce_in_fp32=cfg.parallel.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        weight_decay=cfg.trainer.weight_decay,
        grad_clip=cfg.trainer.grad_clip,
        micro_batch_size=cfg.trainer.micro_batch_size,
        max_tokens_per_micro_batch=cfg.trainer.max_tokens_per_micro_batch,
        sequence_packing=cfg.trainer.packing(),
        freeze_vision=cfg.model.freeze_vision,
        temperature=cfg.rollout.temperature,
        rollout_is_cap=cfg.algorithm.rollout_is_cap,
        loss=cfg.algorithm.policy_loss(default_norm_length=cfg.rollout.max_new_tokens),
    )


def place(bundles: list[dict[str, float]], *, timeout_s: float) -> tuple[Any, list[int]]:
    """A PACK placement group of ``bundles`` and its bundle indices ordered by (node, GPU); RuntimeError naming
    what was asked and what the cluster has when Ray cannot place it within ``timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        asked = {key: sum(b.get(key, 0) for b in bundles) for key in ("GPU", "CPU")}
        have = {key: ray.cluster_resources().get(key, 0) for key in ("GPU", "CPU")}
        free = {key: ray.available_resources().get(key, 0) for key in ("GPU", "CPU")}
        raise RuntimeError(
            f"Ray could not place {len(bundles)} bundles of {bundles[0]} (in all: {asked['GPU']:g} GPUs, "
            f"{asked['CPU']:g} CPUs) within trainer.placement_timeout_s={timeout_s:g} s; the cluster has "
            f"{have['GPU']:g} GPUs / {have['CPU']:g} CPUs ({free['GPU']:g} / {free['CPU']:g} free). Fewer devices: "
            "lower parallel.* or rollout.num_engines, or set trainer.colocate=true")
    where = ray.get([
        ray.remote(_bundle_location).options(
            num_cpus=0, num_gpus=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i),
        ).remote()
        for i in range(len(bundles))
    ])
    return group, sorted(range(len(bundles)), key=lambda i: (where[i][0], where[i][1], i))


class Cluster:
    """The policy workers (TP x PP x DP ranks) and the rollout engines, placed by one placement group."""

    def __init__(self, cfg: Config, *, model_dir: str) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from mmupt_megatron.engines.vllm_rollout import engine_kwargs, training_executor

        start_ray(cfg)
        p = cfg.parallel
        self.dims = ParallelDims(tp=p.tensor_parallel_size, pp=p.pipeline_parallel_size, dp=p.data_parallel_size)
        world = self.dims.world_size
        on_gpu = ray.cluster_resources().get("GPU", 0) > 0  # the driver may run on a node without one
        self.colocated = cfg.trainer.colocate
        engine_tp = cfg.rollout.tensor_parallel_size
        if engine_tp > 1 and not on_gpu:
            raise ValueError(f"rollout.tensor_parallel_size={engine_tp}: tensor-parallel engines need GPUs, and this "
                             "Ray cluster has none; use 1")
        if cfg.rollout.executor == "ray" and not on_gpu:
            raise ValueError("rollout.executor=ray: vLLM's CPU build has no Ray executor (\"current platform cpu does "
                             "not support ray\"); use auto, mp or uni on CPU")
        self.num_engines = cfg.num_engines()
        devices = cfg.devices()
        have = ray.cluster_resources().get("GPU", 0)
        if on_gpu and have < devices:
            raise ValueError(
                f"this run needs {devices} GPUs (policy: parallel.* world size {world}"
                + ("" if self.colocated else f", engines: rollout.num_engines={self.num_engines} x "
                   f"rollout.tensor_parallel_size={engine_tp}") + f") but the Ray cluster has {have:g}")
        share = 1.0 if on_gpu else max(0.02, (cfg.trainer.num_cpus or os.cpu_count() or 1) / devices)
        bundle = {"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": share}
        self.placement, order = place([bundle] * devices, timeout_s=cfg.trainer.placement_timeout_s)
        half = 0.5 if self.colocated else 1.0

        def on(index: int, fraction: float = 1.0, **extra: Any) -> dict[str, Any]:
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.placement,
                                                        placement_group_bundle_index=order[index], **extra)
            return {"scheduling_strategy": strategy, "num_cpus": bundle["CPU"] * fraction,
                    "num_gpus": bundle.get("GPU", 0) * fraction}

        optim = policy_optim_config(cfg)
        deterministic = cfg.trainer.deterministic  # its variables are in each actor's environment from the start

        def env(options: dict[str, Any], *, engine: bool) -> dict[str, Any]:
            if deterministic:
                extra = deterministic_env(engine=engine, on_gpu=on_gpu)
                runtime = options.get("runtime_env", {})
                options["runtime_env"] = {**runtime, "env_vars": {**runtime.get("env_vars", {}), **extra}}
            return options

        # torch.distributed rendezvous on rank 0's node (not the driver's: on a cluster they differ)
        master_addr, port = ray.get(ray.remote(_node_address).options(**on(0)).remote())
        Actor = ray.remote(PolicyWorker)
        self.workers = [
            Actor.options(**env(on(rank, half), engine=False)).remote(
                rank=rank, world_size=world, master_addr=master_addr, master_port=port, dims=self.dims,
                model_dir=model_dir, optim=optim, with_reference=cfg.algorithm.loss.kl_coef > 0, seed=cfg.trainer.seed,
                backend=None if p.backend == "auto" else p.backend,
                model_options={"fp8": cfg.model.fp8, "fp8_recipe": cfg.model.fp8_recipe,
                               "recompute": cfg.model.gradient_checkpointing,
                               "sequence_parallel": p.sequence_parallel, "deterministic": deterministic},
            )
            for rank in range(world)
        ]
        self.infos: list[RankInfo] = ray.get([w.info.remote() for w in self.workers])
        self.schedule = MemorySchedule(_RayDeviceOps(self), colocated=self.colocated)
        self.engines: list[Any] = []
        self.schedule.before_first_rollout()  # the engines measure free device memory when they start
        first = 0 if self.colocated else world
        kwargs = engine_kwargs(cfg.rollout)
        kwargs["executor"] = training_executor(cfg.rollout.executor, tensor_parallel_size=engine_tp)
        for e in range(self.num_engines):
            bundles = [order[first + e * engine_tp + i] for i in range(engine_tp)]
            if kwargs["executor"] != "ray":
                options = on(first + e, half)
            else:  # vLLM's Ray executor places one worker per bundle of ours (its own actors, in our group)
                options = {**on(first + e * engine_tp, 0.0, placement_group_capture_child_tasks=True), "num_cpus": 0.1}
                options["runtime_env"] = {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles)),
                                                       "VLLM_RAY_PER_WORKER_GPUS": str(half)}}
            self.engines.append(ray.remote(RolloutWorker).options(**env(options, engine=True)).remote(
                model_dir=model_dir, engine_kwargs=kwargs))
        self.tokens = ray.get(self.engines[0].tokenizer_info.remote())
        self.bucket_bytes = cfg.rollout.refit_bucket_mib << 20
        self.refit_timeout_s = cfg.rollout.refit_timeout_s
        # this cluster's shared-memory refit segments: /dev/shm/<shm_prefix>*, released at shutdown
        self.shm_prefix = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        self.image_token_id = ray.get(self.workers[0].image_token_id.remote())
        self.param_dtype: torch.dtype = ray.get(self.workers[0].param_dtype.remote())
        self.homes = self._actor_homes()
        """Ray node id -> the actors of this cluster there (``policy rank R``, ``rollout engine E``)."""
        self.refit_routes = self._route_refits(cfg.rollout.refit_transport, on_gpu=on_gpu)
        """Per policy rank: (transport, engines) for each transport its stage's sender uses to reach the engines its
        DP replica refits (the same on each rank of the stage; ``refit_routes.refit_transports``)."""
        self.traffic = BatchTraffic(layout=ray.get(self.workers[0].micro_batch_layout.remote()))
        """Bytes sent to the policy workers and padding computed, per step (``pop``)."""

    def _actor_homes(self) -> dict[str, list[str]]:
        """Ray node id -> labels of this cluster's actors running there."""
        import ray

        homes: dict[str, list[str]] = {}
        named = [*((f"policy rank {r}", w) for r, w in enumerate(self.workers)),
                 *((f"rollout engine {e}", a) for e, a in enumerate(self.engines))]
        for (label, _), (node, _) in zip(named, ray.get([a.device_location.remote() for _, a in named]), strict=True):
            homes.setdefault(node, []).append(label)
        return homes

    def lost_nodes(self) -> list[str]:
        """The nodes of this cluster's actors that are gone: Ray reports them dead, or their raylet does not
        answer (Ray's health check takes a while to notice); each as ``host (address, why; it ran ...)``."""
        import ray

        known = {node["NodeID"]: node for node in ray.nodes()}
        lost = []
        for node_id, labels in getattr(self, "homes", {}).items():
            node = known.get(node_id, {})
            address, port = node.get("NodeManagerAddress", "?"), node.get("NodeManagerPort", 0)
            if node.get("Alive") and _answers(address, port):
                continue
            why = "Ray reports it dead" if not node.get("Alive") else f"its raylet at {address}:{port} does not answer"
            lost.append(f"{node.get('NodeManagerHostname', node_id[:12])} ({address}, {why}; it ran {', '.join(labels)})")
        return lost

    def _get(self, refs: Any, **kwargs: Any) -> Any:
        """``ray.get``; a Ray error met because a node of this cluster is gone becomes ``NodeLostError`` naming it."""
        import ray

        try:
            return ray.get(refs, **kwargs)
        except ray.exceptions.RayError as error:
            try:
                lost = self.lost_nodes()
            except Exception:  # noqa: BLE001 - Ray cannot say either: its own error stands
                lost = []
            if not lost:
                raise
            cause = " ".join(str(error).split())[:300]
            raise NodeLostError(f"lost Ray node {'; '.join(lost)}: {type(error).__name__}: {cause}") from error

    def _route_refits(self, requested: str, *, on_gpu: bool) -> list[list[tuple[str, list[Any]]]]:
        import ray

        engines_at = ray.get([engine.device_location.remote() for engine in self.engines])
        ranks_at = ray.get([worker.device_location.remote() for worker in self.workers])
        senders = [sorted((info.pp_rank, rank) for rank, info in enumerate(self.infos)
                          if info.dp_rank == d and info.tp_rank == 0) for d in range(self.dims.dp)]
        sources = refit_sources(engines_at, [[ranks_at[rank] for _, rank in stage_ranks] for stage_ranks in senders])
        self.refit_sources = sources
        """``refit_sources[e]``: the DP replica that refits engine e."""
        routes, units = [], []
        for rank, info in enumerate(self.infos):
            mine = [e for e, d in enumerate(sources) if d == info.dp_rank]
            sender = next(r for _, r in senders[info.dp_rank] if self.infos[r].pp_rank == info.pp_rank)
            plan = refit_transports(requested, sender=ranks_at[sender], engines=[engines_at[e] for e in mine],
                                    colocated=self.colocated, on_gpu=on_gpu)  # the stage's sender decides
            routes.append([(kind, [self.engines[mine[i]] for i in ids]) for kind, ids in plan])
            units.append(((info.dp_rank, info.pp_rank), mine, [kind for kind, _ in plan]))
        self.refit_waves = refit_waves(units)
        """Policy ranks in refit order: waves one after another, a wave's ranks at once (``refit_waves``)."""
        return routes

    # -- the rollout engines ---------------------------------------------------------------------------
    def generate(self, requests: list[RolloutRequest], spec: SamplingSpec) -> list[Rollout]:
        """``spec.n`` responses per request, the requests split over the engines; in request order."""
        parts = [(run, engine.generate.remote(chunk, sub)) for engine, (run, chunk, sub)
                 in zip(self.engines, dispatch(requests, spec, len(self.engines)), strict=True) if chunk]
        results = assert_on_host(self._get([ref for _, ref in parts]), where="RolloutWorker.generate")
        return merge([(run, rollouts) for (run, _), rollouts in zip(parts, results)])

    def prompt_logprobs(self, requests: list[RolloutRequest], completions: list[list[int]], *,
                        engine: int = 0) -> list[torch.Tensor]:
        """Engine ``engine``'s log-probs of given completions (``RolloutEngine.prompt_logprobs``: refit checks)."""
        return assert_on_host(self._get(self.engines[engine].prompt_logprobs.remote(requests, completions)),
                              where="RolloutWorker.prompt_logprobs")

    # -- fan-out over data-parallel slices -----------------------------------------------------------
    def _per_rank(self, batch: PolicyBatch) -> list[PolicyBatch]:
        """Each worker's DP shard (its images only), counted in ``traffic``; a count the DP size does not divide is
        padded with zero-loss rows (``pad_for_ranks``)."""
        padded = pad_for_ranks(batch, self.dims.dp, image_token_id=self.image_token_id)
        shards = [shard_for_rank(padded, dp_rank=d, dp_size=self.dims.dp, image_token_id=self.image_token_id)
                  for d in range(self.dims.dp)]
        self.traffic.record(shards, copies=[self.dims.world_size // self.dims.dp] * self.dims.dp)
        return [shards[info.dp_rank] for info in self.infos]

    def _gather(self, results: list[Any]) -> list[Any]:
        """The reporting rank's result for each DP rank, in DP order."""
        by_dp = {info.dp_rank: result for info, result in zip(self.infos, results, strict=True) if info.reports}
        return [by_dp[d] for d in range(self.dims.dp)]

    def _all(self, method: str, *args: Any, actors: list[Any] | None = None, **kwargs: Any) -> list[Any]:
        return self._get([getattr(actor, method).remote(*args, **kwargs) for actor in (actors or self.workers)])

    def logprobs(self, batch: PolicyBatch, *, reference: bool = False, temperature: float | None = None) -> torch.Tensor:
        """The policy's (or the reference's) log-probs at rollout.temperature, or at ``temperature``."""
        shards = self._per_rank(batch)
        with self.schedule.reference() if reference else nullcontext():  # the reference is on the device only then
            results = self._get([w.logprobs.remote(s, reference=reference, temperature=temperature)
                               for w, s in zip(self.workers, shards)])
        assert_on_host(results, where="PolicyWorker.logprobs")
        return torch.cat(self._gather(results), dim=0)[: batch.input_ids_BT.shape[0]]

    def train(self, batch: PolicyBatch, *, scale: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:
        """One optimizer step on ``batch``, the loss averaged over its tokens (sequences) times ``scale``."""
        shards = self._per_rank(batch)
        num_tokens, num_seqs = loss_normalisers(batch, scale)
        self.schedule.before_train()  # the step's first update: gradients and optimizer state back
        results = self._get([
            w.train.remote(s, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
            for w, s in zip(self.workers, shards)
        ])
        per_dp = self._gather(assert_on_host(results, where="PolicyWorker.train"))
        merged = combine_metrics(per_dp)
        merged["loss"] = sum(r["loss"] for r in per_dp)
        return merged

    def release_engine(self) -> None:
        """After a rollout: the engines sleep (colocated); the policy gets its training state back before training."""
        self.schedule.after_rollout()

    def refit(self) -> int:
        """Stream the policy's weights into every engine in buckets of whole layers, each engine from its replica
        (``refit_routes``); returns the bytes sent. Colocated: the policy's training state leaves the device
        first and the engines wake around it."""
        self.schedule.before_refit()
        sent = 0
        for wave in self.refit_waves:  # senders that share engines over a collective never refit at once
            sent += sum(self._get([self.workers[rank].refit.remote(
                self.refit_routes[rank], bucket_bytes=self.bucket_bytes, shm_prefix=self.shm_prefix,
                timeout_s=self.refit_timeout_s) for rank in wave]))
        self.schedule.after_refit()
        return sent

    def save(self, folder: str) -> None:
        with self.schedule.around_checkpoint():
            self._all("save", folder)

    def load(self, folder: str) -> None:
        with self.schedule.around_checkpoint():
            self._all("load", folder)

    def export_hf(self, out_dir: str) -> None:
        self._all("export_hf", out_dir)

    def shutdown(self) -> None:
        """Release the refit's shared memory, stop the actors. Also after an error: a worker that died
        cannot release its segments, so this host's leftovers of this cluster are unlinked here."""
        import ray

        try:
            ray.get([w.release_refit.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or stuck worker: its segments are swept below
            pass
        for actor in [*self.workers, *self.engines]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement)
        sweep_segments(self.shm_prefix)


class _RayDeviceOps:
    """``DeviceOps`` as fan-outs to the cluster's actors."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def engines_sleep(self) -> None:
        self.cluster._all("sleep", actors=self.cluster.engines)

    def engines_wake(self, tags: tuple[str, ...]) -> None:
        self.cluster._all("wake_up", list(tags), actors=self.cluster.engines)

    def policy_offload(self) -> None:
        self.cluster._all("offload")

    def policy_onload(self, *, grads: bool = True) -> None:
        self.cluster._all("onload", grads)

    def reference_onload(self) -> None:
        self.cluster._all("onload_reference")

    def reference_offload(self) -> None:
        self.cluster._all("offload_reference")
