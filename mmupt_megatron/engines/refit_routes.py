"""Which data-parallel replica of the policy refits which rollout engine.

Every DP replica holds the same weights, so any one of them can refit an engine. Each engine takes its
weights from the replica whose sending ranks (TP rank 0 of each pipeline stage) are closest to it: on its own
GPU first (CUDA IPC, no copy across devices), then on its node (host shared memory / IPC between GPUs of one
node), and only then across nodes (a broadcast). Among equally close replicas the one serving the fewest
engines so far wins, so the refit's sending work spreads over the replicas. Colocated on one node of 8 GPUs
with 8 engines and DP 8, replica d refits the engine on its own GPU; a policy with DP 1 refits every engine
(what a single sender does).

A location is (node id, GPU ids) as Ray reports it for an actor (``ray.get_gpu_ids()``; empty on CPU, and for a
tensor-parallel engine whose GPUs belong to vLLM's own workers).

``refit_transports`` resolves ``rollout.refit_transport=auto`` for one sender and each of its engines (see there);
``refit_waves`` orders the senders so that no two refit groups can wait on each other.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

Location = tuple[str, tuple[str, ...]]


def refit_sources(engines: Sequence[Location], replicas: Sequence[Sequence[Location]]) -> list[int]:
    """For each engine, the index of the DP replica that sends it its weights.

    ``replicas[d]`` lists where replica d's senders run (one per pipeline stage). Deterministic: ties go to the
    less loaded, then the lower-numbered replica."""
    if not replicas or any(not senders for senders in replicas):
        raise ValueError("refit_sources: every replica needs at least one sender location")
    load = [0] * len(replicas)
    sources = []
    for where in engines:
        best = max(range(len(replicas)), key=lambda d, where=where: (*_closeness(where, replicas[d]), -load[d], -d))
        load[best] += 1
        sources.append(best)
    return sources


def _closeness(engine: Location, senders: Sequence[Location]) -> tuple[int, int]:
    """(senders on the engine's GPU, senders on its node)."""
    node, gpus = engine
    return (sum(n == node and bool(set(g) & set(gpus)) for n, g in senders), sum(n == node for n, _ in senders))


TRANSPORTS = ("ipc", "shm", "broadcast", "ray")


def refit_transports(requested: str, *, sender: Location, engines: Sequence[Location], colocated: bool,
                     on_gpu: bool) -> list[tuple[str, list[int]]]:
    """How one sender reaches each of its ``engines``: (transport, the engines' indices) per transport it needs
    (``rollout.refit_transport``; ``auto`` resolved here). Host memory and device handles are shared only within
    a host, so the engines on the sender's host and those elsewhere are decided apart:

    - another host: ``broadcast`` (NCCL across the network on GPU, gloo on CPU).
    - this host, GPU, colocated, every such engine on the sender's own GPU (engine TP 1): ``ipc``, a CUDA IPC handle
      to the bucket.
    - this host, GPU, colocated otherwise (a tensor-parallel engine, or engines on the GPUs of the sender's TP
      peers): ``shm``, host shared memory. Neither GPU path works there: NCCL cannot hold the sender's GPU twice (an
      engine worker shares it), and Ray shows each actor only its own GPU, so a CUDA IPC handle does not open on
      another one.
    - this host, GPU, engines on GPUs of their own: ``broadcast`` over NCCL (NVLink).
    - this host, CPU: ``shm``.

    A pipeline stage on another node than some of its engines (the 32B / 72B recipes) thus sends to them by
    broadcast and to its own node's engines by shared memory. A transport named explicitly applies to every
    engine, and ``ipc`` / ``shm`` across hosts is refused, naming the engine."""
    if requested != "auto" and requested not in TRANSPORTS:
        raise ValueError(f"rollout.refit_transport must be auto or one of {TRANSPORTS}, got {requested!r}")
    node, gpus = sender
    local = [i for i, (n, _) in enumerate(engines) if n == node]
    remote = [i for i, (n, _) in enumerate(engines) if n != node]
    if requested != "auto":
        if requested in ("ipc", "shm") and remote:
            raise ValueError(f"rollout.refit_transport={requested}: engine {remote[0]} runs on node "
                             f"{engines[remote[0]][0]}, the sender on {node}; {requested} works only within a host "
                             "(use auto, broadcast or ray)")
        return [(requested, list(range(len(engines))))] if engines else []
    plan: dict[str, list[int]] = {}
    if local:
        here = [engines[i] for i in local]
        if not on_gpu:
            kind = "shm"
        elif not colocated:
            kind = "broadcast"
        else:
            kind = "ipc" if gpus and all(g == gpus for _, g in here) else "shm"
        plan[kind] = local
    if remote:
        plan.setdefault("broadcast", []).extend(remote)
    return [(kind, sorted(ids)) for kind, ids in plan.items()]


COLLECTIVE = ("broadcast",)
"""Transports whose every bucket is a collective of the sender and all its engines' workers."""


def refit_waves(routes: Sequence[tuple[Hashable, Sequence[int], str | Sequence[str]]]) -> list[list[int]]:
    """The policy ranks in the order they refit: waves run one after another, the ranks of a wave at once.

    ``routes[rank]`` = (the rank's sending unit: its (DP replica, pipeline stage), whose TP ranks take part in one
    stream —, the engines it refits, its transport or transports). An engine actor runs one task at a time, and tasks from
    different senders reach it in no set order. Where each bucket is a collective of the sender and every engine
    of its group (``COLLECTIVE``), two such groups that share engines could each hold one engine and wait for the
    other — the deadlock of a PP=2 policy whose two stages broadcast to the same two engines. So no two collective
    units that share an engine are in one wave; everything else (and every rank that refits nothing) is in the
    first. Deterministic: units in order of first appearance, each in the earliest wave it fits."""
    units: dict[Hashable, set[int]] = {}  # the collective units' engines, in order of first appearance
    for unit, engines, transport in routes:
        kinds = {transport} if isinstance(transport, str) else set(transport)
        if kinds & set(COLLECTIVE) and engines:
            units.setdefault(unit, set()).update(engines)
    wave_of: dict[Hashable, int] = {}
    wave_engines: list[set[int]] = [set()]
    for unit, wanted in units.items():
        wave_of[unit] = next((w for w, used in enumerate(wave_engines) if not used & wanted), len(wave_engines))
        if wave_of[unit] == len(wave_engines):
            wave_engines.append(set())
        wave_engines[wave_of[unit]] |= wanted
    waves: list[list[int]] = [[] for _ in wave_engines]
    for rank, (unit, _, _) in enumerate(routes):
        waves[wave_of.get(unit, 0)].append(rank)
    return [wave for wave in waves if wave]


__all__ = ["COLLECTIVE", "TRANSPORTS", "Location", "refit_sources", "refit_transports", "refit_waves"]
