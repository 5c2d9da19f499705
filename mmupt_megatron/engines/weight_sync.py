"""Refit: reshard the Megatron policy's weights (any TP/PP) into HF-named full tensors and stream them into
the rollout engine in buckets of whole layers; verify the refit against the policy's own log-probs.

    # every Megatron rank (collective within its TP group); sender on TP rank 0 / DP rank 0 of each stage
    send_refit(model, ShmSender(conn) if sends else None, bucket_bytes=256 << 20)
    # next to the engine, one receiver per pipeline stage, first stage first
    load_refit(engine, [PipeReceiver(c, reuse_buffers=True) for c in stage_conns])
    verify_refit(engine, requests, completions, policy_logprobs, tol=cfg.rollout.verify_refit_tol)

- **Manifest first.** ``refit_manifest`` runs the reference mappings (``models.mapping``, via
  ``models.hf_gather.iter_hf_groups(shapes_only=True)``) on meta tensors: every (name, shape, dtype) that
  will be sent, per layer, with no gather and no memory; the data is placed by the slicing pieces,
  checked against this manifest before any gather. The sender offers it;
  the receiver checks the whole model's manifest against the engine (names, shapes, fused siblings,
  completeness, duplicates) and answers before any weight moves — a bad name from a mapping is a
  ValueError naming it, and the engine is untouched.
- **Buckets of whole layers.** ``plan_buckets`` cuts the ordered layer groups into buckets of at most
  ``bucket_bytes``; a layer larger than that travels alone. A serving engine fuses q/k/v and gate/up, and
  loading part of a fused layer leaves the rest undefined, so a bucket is loadable on its own: one
  ``engine.load_weights(bucket, manifest=bucket_manifest)`` call per bucket.
- **Memory and copies.** Every piece goes straight to its place in the bucket buffer the transport hands
  out (QKV / gate-up un-fused by the slicing itself, ``mapping.layer_pieces``). If that buffer is host
  shared memory (``ShmSender``) all TP ranks of the stage map it and write their own pieces in parallel
  — no TP gather at all; otherwise TP rank 0 receives its peers' pieces in place over the process group
  (``models.hf_gather.gather_group``) while copying its own. A rank's extra memory is one bucket plus a
  small staging buffer for row-parallel column blocks, never the model. DP replicas other than DP rank 0
  do nothing.
- **Transport** (``weight_transport``): the packing writes into whatever buffer the sender hands out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mmupt_megatron.engines.weight_transport import (
    BucketLayout,
    ManifestEntry,
    WeightReceiver,
    WeightSender,
    map_shared_segment,
)
from mmupt_megatron.models.safetensors_io import TORCH_DTYPES

DEFAULT_BUCKET_BYTES = 256 << 20
_ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}

GroupManifest = list[tuple[str, list[ManifestEntry]]]
"""(layer group key, its tensors) in send order."""


def refit_manifest(model: torch.nn.Module) -> GroupManifest:
    """What this pipeline stage will send, per whole layer; pure (meta tensors), identical on every rank."""
    from mmupt_megatron.models.hf_gather import iter_hf_groups

    return [
        (key, [ManifestEntry.of(name, tensor) for name, tensor in tensors.items()])
        for key, tensors in iter_hf_groups(model, shapes_only=True)
    ]


def flat_manifest(grouped: GroupManifest) -> list[ManifestEntry]:
    return [entry for _, entries in grouped for entry in entries]


def plan_buckets(grouped: GroupManifest, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketLayout]:
    """Consecutive layer groups packed greedily into buckets of at most ``bucket_bytes`` (a group larger
    than that is a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    plan: list[BucketLayout] = []
    keys: list[str] = []
    entries: list[ManifestEntry] = []
    filled = [0]

    def flush() -> None:
        offsets, total = [], 0
        for entry in entries:
            offsets.append(total)
            total += entry.nbytes
        plan.append(BucketLayout(index=len(plan), groups=tuple(keys), entries=tuple(entries),
                                 offsets=tuple(offsets), nbytes=total))
        keys.clear()
        entries.clear()
        filled[0] = 0

    for key, group in grouped:
        size = sum(entry.nbytes for entry in group)
        if entries and filled[0] + size > bucket_bytes:
            flush()
        keys.append(key)
        entries.extend(group)
        filled[0] += size
    if entries:
        flush()
    return plan


def _broadcast_refusal(refusal: str | None, groups: Any) -> str | None:
    if groups.dims.tp == 1:
        return refusal
    box = [refusal]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.tp_group, 0), group=groups.tp_group)
    return box[0]


@dataclass(kw_only=True)
class SendStats:
    num_buckets: int = 0
    num_tensors: int = 0
    num_bytes: int = 0
    num_shared_buckets: int = 0
    """Buckets every TP rank wrote its pieces into (host shared memory) instead of a TP gather."""
    plan: list[BucketLayout] = field(default_factory=list)


def _check_against_plan(plan: Sequence[BucketLayout], groups: dict) -> None:
    """ValueError naming the first layer group or tensor where the bucket plan (from the manifest) and the
    placement plan (``models.hf_gather.plan_hf_groups``) disagree. Pure, so every TP rank raises alike."""
    from mmupt_megatron.models.safetensors_io import ST_DTYPES

    order = list(groups)
    position = 0
    for layout in plan:
        cursor = 0
        for key in layout.groups:
            got = order[position] if position < len(order) else None
            if got != key:
                raise ValueError(f"refit: expected layer group {key!r} next, the model produced {got!r}")
            position += 1
            tensors = groups[key].tensors
            announced = {entry.name: entry for entry in layout.entries[cursor : cursor + len(tensors)]}
            for name, shape, dtype in tensors:  # the same tensors, in the manifest's order
                entry = announced.get(name)
                if entry is None or ManifestEntry(name, tuple(shape), ST_DTYPES[dtype]) != entry:
                    raise ValueError(f"refit: streamed {name!r} {tuple(shape)} {dtype} differs from the manifest entry "
                                     f"{entry or sorted(announced)}")
            cursor += len(tensors)
        if cursor != len(layout.entries):
            raise ValueError(f"refit: bucket {layout.index} filled {cursor} of {len(layout.entries)} tensors; "
                             f"missing {layout.entries[cursor].name!r}")
    if position != len(order):
        raise ValueError(f"refit: layer group {order[position]!r} is not in the manifest")


def _bucket_views(data: torch.Tensor, layout: BucketLayout, group) -> tuple[dict[str, torch.Tensor], list]:
    """Typed views of ``group``'s tensors in the bucket buffer; a tensor whose offset is not aligned to its
    dtype gets a temporary, copied in afterwards (returned as (temporary, byte range) pairs)."""
    out, unaligned = {}, []
    index = {entry.name: i for i, entry in enumerate(layout.entries)}
    for name, shape, dtype in group.tensors:
        i = index[name]
        start, nbytes = layout.offsets[i], layout.entries[i].nbytes
        if start % dtype.itemsize == 0:
            out[name] = data[start : start + nbytes].view(dtype).reshape(shape)
        else:
            out[name] = torch.empty(shape, dtype=dtype)
            unaligned.append((out[name], data[start : start + nbytes]))
    return out, unaligned


_PEER_MAPPINGS: dict[str, torch.Tensor] = {}
"""Shared-memory buckets this TP peer has mapped (by segment name; the sender reuses its segments)."""


def release_peer_mappings() -> None:
    """Unmap the shared buckets this process mapped as a TP peer. Segments a sender has released stay
    allocated while mapped; such stale mappings are otherwise dropped at this rank's next refit."""
    _PEER_MAPPINGS.clear()


def _map_segment(name: str) -> torch.Tensor:
    mapped = _PEER_MAPPINGS.get(name)
    if mapped is None:
        map_shared_segment(name, _PEER_MAPPINGS)
        mapped = _PEER_MAPPINGS[name]
    return mapped


def _shared_bucket(sender: WeightSender | None, layout: BucketLayout, groups: Any) -> tuple[str, int] | None:
    """Collective over the TP group: (segment, data offset) of the bucket buffer TP rank 0 was just handed,
    if its transport shares it on this host and every TP rank can map it; else None (gather instead)."""
    share = getattr(sender, "share", None)
    box = [share() if share is not None else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.tp_group, 0), group=groups.tp_group)
    target = box[0]
    usable = torch.tensor([int(target is not None and os.path.exists(f"/dev/shm/{target[0]}"))])
    dist.all_reduce(usable, op=dist.ReduceOp.MIN, group=groups.tp_group)
    return target if usable.item() else None


def pack_buckets(model: torch.nn.Module, plan: Sequence[BucketLayout], *, sender: WeightSender | None,
                 stats: SendStats | None = None) -> Iterator[BucketLayout]:
    """Fill each planned bucket in the buffer ``sender.buffer`` hands out and yield its layout (TP rank 0).
    Other TP ranks pass ``sender=None``: they contribute their pieces and yield nothing. Before any data
    moves, every rank checks the plan against the placement plan (ValueError naming the tensor).

    Each piece goes straight to its place in the bucket, un-fused by the slicing itself:
    - if the bucket is host shared memory every TP rank can map (``ShmSender.share``), each TP rank copies
      its own pieces into it, in parallel, and a TP barrier ends the bucket — no gather at all;
    - else ``models.hf_gather.gather_group``: the peers' pieces are received into the bucket over the
      process group, TP rank 0 copies its own there once; only column blocks of row-parallel matrices
      pass through a small reused staging buffer."""
    from mmupt_megatron.models.hf_gather import gather_group, model_device, place_own_pieces, plan_hf_groups, staging_bytes
    from mmupt_megatron.models.safetensors_io import Staging

    groups = {group.key: group for group in plan_hf_groups(model)}
    _check_against_plan(plan, groups)
    params = dict(model.named_parameters())
    staging = Staging(staging_bytes(list(groups.values()), params), device=model_device(model))
    tp_group = model.groups
    for layout in plan:
        data = sender.buffer(layout) if sender is not None else None
        aligned = all(offset % _ITEMSIZE[entry.dtype] == 0 for entry, offset in zip(layout.entries, layout.offsets, strict=True))
        shared = _shared_bucket(sender, layout, tp_group) if tp_group.dims.tp > 1 and aligned else None
        if shared is not None:
            if data is None:
                name, offset = shared
                data = _map_segment(name)[offset : offset + layout.nbytes]
            for key in layout.groups:
                out, _ = _bucket_views(data, layout, groups[key])
                place_own_pieces(model, groups[key], out, params=params)
                del out
            del data
            dist.barrier(group=tp_group.tp_group)  # every piece is in place
            if stats is not None:
                stats.num_shared_buckets += 1
            if sender is not None:
                yield layout
            continue
        for key in layout.groups:
            out, unaligned = _bucket_views(data, layout, groups[key]) if data is not None else (None, [])
            gather_group(model, groups[key], out, params=params, staging=staging)
            for tensor, target in unaligned:
                target.copy_(tensor.reshape(-1).view(torch.uint8))
            del out, unaligned
        if sender is not None:
            del data  # the transport may unmap the buffer once sent
            yield layout


def send_refit(model: torch.nn.Module, sender: WeightSender | None, *,
               bucket_bytes: int = DEFAULT_BUCKET_BYTES, active: bool | None = None) -> SendStats:
    """Stream this stage's weights through ``sender``. Collective over the TP group of every replica that sends
    (``active``; default: DP rank 0 only), with a sender on its TP rank 0 (None elsewhere). Several DP replicas
    may send at once, each to its own engines (``engines/refit_routes.py``): they hold the same weights and
    their TP groups gather independently. Raises ValueError if the receiver refuses the manifest (on every TP
    rank of the stage), before any gather."""
    groups = model.groups
    if not (groups.dp_rank == 0 if active is None else active):
        return SendStats()
    is_sender = groups.tp_rank == 0
    if is_sender and sender is None:
        raise ValueError("sender: required on TP rank 0 of a sending replica (this rank sends its stage's weights)")
    grouped = refit_manifest(model)
    plan = plan_buckets(grouped, bucket_bytes=bucket_bytes)
    refusal = _broadcast_refusal(sender.offer(flat_manifest(grouped)) if is_sender else None, groups)
    if refusal is not None:
        raise ValueError(f"refit refused by the receiver: {refusal}")
    stats = SendStats(plan=plan)
    for layout in pack_buckets(model, plan, sender=sender if is_sender else None, stats=stats):
        sender.send(layout)
        stats.num_buckets += 1
        stats.num_tensors += len(layout.entries)
        stats.num_bytes += layout.nbytes
    if is_sender:
        sender.close()
    return stats


# ------------------------------------------------------------------ receiving side


def check_refit_manifest(engine: Any, manifest: Sequence[ManifestEntry], *, complete: bool = True) -> None:
    """ValueError naming the first offending tensor: duplicate, unknown to the engine, wrong shape, fused
    sibling missing (``engine.check_manifest``) or — with ``complete`` — an engine parameter not sent."""
    seen: set[str] = set()
    for entry in manifest:
        if entry.name in seen:
            raise ValueError(f"refit: {entry.name!r} is sent twice")
        seen.add(entry.name)
    expected = getattr(engine, "expected_shapes", None)
    if expected is not None:  # names and shapes first: the fused-sibling rule would blame a neighbour
        for entry in manifest:
            if entry.name not in expected:
                raise ValueError(f"refit: {entry.name!r} is not a parameter of the engine's model")
            if tuple(entry.shape) != tuple(expected[entry.name]):
                raise ValueError(f"refit: {entry.name!r} has shape {entry.shape}, the engine expects "
                                 f"{tuple(expected[entry.name])}")
    engine.check_manifest([(entry.name, entry.shape) for entry in manifest])
    if complete:
        if expected is None:
            raise ValueError("complete=True needs engine.expected_shapes (the engine's parameter names)")
        missing = sorted(set(expected) - seen)
        if missing:
            raise ValueError(f"refit: {len(missing)} engine parameters would not be updated, e.g. {missing[:4]}")


@dataclass(kw_only=True)
class LoadStats:
    num_buckets: int = 0
    num_tensors: int = 0
    num_bytes: int = 0
    bucket_names: list[list[str]] = field(default_factory=list)


def load_refit(engine: Any, receivers: Sequence[WeightReceiver], *, complete: bool = True) -> LoadStats:
    """Receive a refit (one receiver per pipeline stage, first stage first) into ``engine``: validate the
    whole manifest and answer every sender, then load bucket by bucket. ValueError (after refusing) if the
    manifest is bad; ValueError if a stream diverges from its manifest."""
    manifests = [receiver.manifest() for receiver in receivers]
    refusal = None
    try:
        check_refit_manifest(engine, [entry for manifest in manifests for entry in manifest], complete=complete)
    except ValueError as exc:
        refusal = str(exc)
    for receiver in receivers:
        receiver.answer(refusal)
    if refusal is not None:
        raise ValueError(refusal)
    stats = LoadStats()
    for stage, (receiver, manifest) in enumerate(zip(receivers, manifests, strict=True)):
        position = 0
        for entries, tensors in receiver.buckets():
            announced = manifest[position : position + len(entries)]
            if entries != announced:
                first = next((e for e, a in zip(entries, announced + [None] * len(entries)) if e != a), entries[-1])
                raise ValueError(f"refit: stage {stage} sent {first} where its manifest announced otherwise")
            position += len(entries)
            engine.load_weights(tensors, manifest=[(e.name, e.shape) for e in entries])
            stats.num_buckets += 1
            stats.num_tensors += len(entries)
            stats.num_bytes += sum(e.nbytes for e in entries)
            stats.bucket_names.append([e.name for e in entries])
            del tensors
        if position != len(manifest):
            raise ValueError(f"refit: stage {stage} ended before sending {manifest[position].name!r}")
    return stats


# ------------------------------------------------------------------ verification (rollout.verify_refit)


class RefitMismatchError(RuntimeError):
    """The engine's log-probs after a refit differ from the policy's beyond the tolerance."""


def completion_logprobs(logprobs_BT: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Per sample, the policy's log-probs of its last ``lengths[b]`` tokens (right-aligned rows, as in a
    left-padded probe batch; ``logprobs_BT`` as from ``MegatronPolicy.compute_logprobs``)."""
    if logprobs_BT.shape[0] != len(lengths):
        raise ValueError(f"lengths: {len(lengths)} values for {logprobs_BT.shape[0]} rows of logprobs_BT")
    return [logprobs_BT[b, logprobs_BT.shape[1] - n :].float().cpu() for b, n in enumerate(lengths)]


REFIT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.5}
"""``rollout.verify_refit_tol=0`` (auto): the largest |engine - policy| log-prob gap on one token that still counts
as the same weights, by the policy's parameter dtype. In fp32 (CPU) the two stacks agree to ~1e-5. In bf16 a logit
of magnitude L is rounded by up to L x 2^-9, and the Megatron and vLLM kernels round and sum in different orders
through every layer: single-token gaps of 0.05-0.3 nats are normal there (NeMo-RL's bf16 Megatron -> vLLM checks
allow a token-probability ratio of a few percent on average, more at single tokens), while a wrong, missing or
stale layer moves log-probs by whole nats. A small training step moves them less than bf16 noise: in bf16 the check
catches a broken refit, not a refit one step late."""


def refit_tolerance(dtype: torch.dtype) -> float:
    """``REFIT_TOL`` for the policy's parameter dtype (1e-3 for any other)."""
    return REFIT_TOL.get(dtype, 1e-3)


def verify_refit(engine: Any, requests: Sequence[Any], completions: Sequence[list[int]],
                 policy_logprobs: Sequence[torch.Tensor], *, tol: float = 1e-3) -> float:
    """Score ``completions`` with the engine (``engine.prompt_logprobs``) and compare with the policy's
    log-probs of the same tokens. Returns the max absolute difference; raises ``RefitMismatchError`` naming
    the sample, its group and the token if it exceeds ``tol`` (NaN counts as infinitely far)."""
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not (len(requests) == len(completions) == len(policy_logprobs)):
        raise ValueError(f"requests ({len(requests)}), completions ({len(completions)}) and policy_logprobs "
                         f"({len(policy_logprobs)}) must have the same length")
    engine_logprobs = engine.prompt_logprobs(requests, completions)
    worst = (0.0, -1, -1)
    for index, (mine, theirs, tokens) in enumerate(zip(engine_logprobs, policy_logprobs, completions, strict=True)):
        theirs = theirs.detach().float().cpu()
        if mine.shape != theirs.shape:
            raise ValueError(f"policy_logprobs[{index}] has shape {tuple(theirs.shape)}, completion has {len(tokens)} tokens")
        diff = torch.nan_to_num((mine.float() - theirs).abs(), nan=float("inf"))
        token = int(diff.argmax())
        if float(diff[token]) > worst[0] or worst[1] < 0:
            worst = (float(diff[token]), index, token)
    max_diff, index, token = worst
    if max_diff > tol:
        raise RefitMismatchError(
            f"refit verification failed: max |engine - policy| log-prob = {max_diff:.3g} > tol {tol:g} at sample "
            f"{index} (group {requests[index].group_id!r}), completion token {token} (id {completions[index][token]}): "
            f"engine {float(engine_logprobs[index][token]):.6f}, policy {float(policy_logprobs[index][token]):.6f}"
        )
    return max_diff
