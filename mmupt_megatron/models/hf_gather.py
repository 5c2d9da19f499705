"""Megatron shards -> full HF tensors, one whole layer at a time, with no intermediate copies.

``plan_hf_groups`` lists, per whole layer (the unit a serving engine fuses: q/k/v, gate/up), its HF
tensors and the pieces (``mapping.layer_pieces`` / ``vocab_piece``) every TP rank holds. ``gather_group``
fills caller-given destinations on TP rank 0 — e.g. views into a refit bucket — receiving the peers'
pieces in place over point-to-point sends (gloo on CPU, NCCL on GPU) while copying its own: each byte is
copied once, QKV / gate-up are un-fused by the slicing itself, and only column blocks of row-parallel
matrices (o_proj, down_proj) pass through a small reused staging buffer. ``export_hf_weights`` writes each
tensor to its safetensors file as it is gathered (row-wise tensors such as the vocabulary chunk by
chunk), so TP rank 0 never holds more than one layer; the peers send from their parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmupt_megatron.models import mapping as M
from mmupt_megatron.models.safetensors_io import Staging, safetensors_header, tensor_bytes

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_CHUNK_BYTES = 32 << 20
"""Row-wise pieces larger than this travel (and are written) in chunks of about this size."""


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _hf_contiguous(piece: M.Piece, hf_shape: Sequence[int]) -> bool:
    return piece.dim == 0 or piece.size == hf_shape[piece.dim]


@dataclass(frozen=True, slots=True)
class Source:
    """One piece of an HF tensor and the TP rank that holds it (its Megatron view is contiguous there)."""

    hf_name: str
    tp_rank: int
    param: str
    """Full Megatron parameter name (the same on every TP rank of the stage)."""
    piece: M.Piece
    in_place: bool
    """Its HF view is contiguous: it can be received straight into the destination."""


@dataclass(frozen=True, slots=True)
class HFGroup:
    """A whole layer (or the embedding, a vision unit, the final norm, the LM head): its HF tensors in order
    (name, shape, dtype) and every piece that makes them, tensor by tensor, in HF order."""

    key: str
    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    sources: tuple[Source, ...]

    @property
    def nbytes(self) -> int:
        total = 0
        for _, shape, dtype in self.tensors:
            numel = 1
            for size in shape:
                numel *= size
            total += numel * dtype.itemsize
        return total


def _vision_group(hf_name: str) -> str:
    """The unit a vision tensor belongs to: ``visual.blocks.N`` for a block, else ``visual.<module>``."""
    parts = hf_name.split(".")
    return ".".join(parts[:3]) if parts[1] == "blocks" else ".".join(parts[:2])


def _chunked(sources: Sequence[Source], shapes: Mapping[str, tuple[int, ...]], dtype_of: Mapping[str, torch.dtype],
             chunk_bytes: int) -> list[Source]:
    """Split row-wise sources larger than ``chunk_bytes`` into row chunks (every rank splits alike)."""
    out = []
    for source in sources:
        shape, piece = shapes[source.hf_name], source.piece
        row_numel = 1
        for size in shape[1:]:
            row_numel *= size
        row_bytes = row_numel * dtype_of[source.hf_name].itemsize
        if piece.dim != 0 or piece.size * row_bytes <= chunk_bytes:
            out.append(source)
            continue
        rows = max(1, chunk_bytes // row_bytes)
        for start in range(0, piece.size, rows):
            part = M.Piece(piece.hf_key, piece.meg_key, 0, piece.hf_start + start, piece.meg_start + start,
                           min(rows, piece.size - start), piece.replicated)
            out.append(Source(source.hf_name, source.tp_rank, source.param, part, source.in_place))
    return out


def _group(key: str, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], sources: list[Source],
           chunk_bytes: int) -> HFGroup:
    order = {name: index for index, (name, _, _) in enumerate(tensors)}
    shapes = {name: shape for name, shape, _ in tensors}
    dtypes = {name: dtype for name, _, dtype in tensors}
    ordered = sorted(sources, key=lambda s: (order[s.hf_name], s.piece.hf_start, s.tp_rank))
    return HFGroup(key, tuple(tensors), tuple(_chunked(ordered, shapes, dtypes, chunk_bytes)))


def plan_hf_groups(model: torch.nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[HFGroup]:
    """The HF tensors of this pipeline stage, per whole layer, in a fixed order: ``embedding``, the vision
    units (``visual.patch_embed``, ``visual.blocks.N``, ``visual.merger``), ``layers.N`` (global index),
    ``final_norm``, ``lm_head`` — with the pieces every TP rank holds. Pure: the same on every rank."""
    arch, groups = model.arch, model.groups
    tp = groups.dims.tp
    params = _params(model)
    lm = M.MEG_LM_PREFIX

    def whole(hf_name: str, name: str) -> Source:
        param = params[name]
        assert param.dim() >= 1, name
        return Source(hf_name, 0, name, M.Piece(hf_name, name, 0, 0, 0, param.shape[0], replicated=True), True)

    def vocab(key: str, hf_name: str, name: str) -> HFGroup:
        param = params[name]
        shape = (arch.vocab_size, *param.shape[1:])
        sources = []
        for rank in range(tp):
            piece = M.vocab_piece(hf_name, name, vocab_size=arch.vocab_size, padded_vocab=model.padded_vocab, tp=tp,
                                  tp_rank=rank)
            if piece is not None:
                sources.append(Source(hf_name, rank, name, piece, True))
        return _group(key, [(hf_name, shape, param.dtype)], sources, chunk_bytes)

    plan: list[HFGroup] = []
    if model.pre_process:
        plan.append(vocab("embedding", M.HF_EMBEDDING, lm + M.MEG_EMBEDDING))
        if model.vision_model is not None:
            units: dict[str, list[str]] = {}
            for name in params:
                if name.startswith(M.MEG_VISION_PREFIX):
                    units.setdefault(_vision_group(M.megatron_vision_to_hf(name)), []).append(name)
            for key, names in units.items():
                tensors = [(M.megatron_vision_to_hf(n), tuple(params[n].shape), params[n].dtype) for n in names]
                plan.append(_group(key, tensors, [whole(M.megatron_vision_to_hf(n), n) for n in names], chunk_bytes))
    dims = M.AttentionDims.of(arch)
    per_rank = [M.layer_pieces(dims, ffn_hidden_size=arch.ffn_hidden_size, hidden_size=arch.hidden_size, tp=tp,
                               tp_rank=rank, te_spec=model.te_spec) for rank in range(tp)]
    hf_shapes = M.hf_layer_shapes(dims, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size)
    slot_of = {piece.hf_key: piece.meg_key for piece in per_rank[0]}
    for local, layer in enumerate(M.stage_layers(arch, pp=groups.dims.pp, pp_rank=groups.pp_rank)):
        prefix, meg = M.hf_layer_prefix(layer), f"{lm}decoder.layers.{local}."
        tensors = [(prefix + key, shape, params[meg + slot_of[key]].dtype) for key, shape in hf_shapes.items()]
        sources = [
            Source(prefix + piece.hf_key, rank, meg + piece.meg_key, piece, _hf_contiguous(piece, hf_shapes[piece.hf_key]))
            for rank in range(tp) for piece in per_rank[rank] if not (piece.replicated and rank)
        ]
        plan.append(_group(f"layers.{layer}", tensors, sources, chunk_bytes))
    if model.post_process:
        name = lm + M.MEG_FINAL_NORM
        plan.append(_group("final_norm", [(M.HF_FINAL_NORM, tuple(params[name].shape), params[name].dtype)],
                           [whole(M.HF_FINAL_NORM, name)], chunk_bytes))
        if not arch.tie_word_embeddings:
            plan.append(vocab("lm_head", M.HF_OUTPUT, lm + M.MEG_OUTPUT))
    return plan


def _peer(groups, tp_rank: int) -> int:
    return dist.get_global_rank(groups.tp_group, tp_rank)


def _meg_shape(source: Source, params: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(source.piece.meg_view(params[source.param]).shape)


@torch.no_grad()
def gather_group(model: torch.nn.Module, group: HFGroup, out: Mapping[str, torch.Tensor] | None, *,
                 params: Mapping[str, torch.Tensor], staging: Staging) -> None:
    """Collective over the stage's TP group: TP rank 0 fills ``out[name]`` (preallocated, e.g. views into a
    refit bucket) with the group's full HF tensors; the other TP ranks send their pieces (``out`` None).

    TP rank 0 posts a receive for every peer piece first — straight into its place in ``out`` when that
    is contiguous, else into ``staging`` — then copies its own pieces while they arrive, then places the
    staged column blocks."""
    groups = model.groups
    me = groups.tp_rank
    if me != 0:
        sends = [dist.isend(s.piece.meg_view(params[s.param].detach()), dst=_peer(groups, 0), group=groups.tp_group)
                 for s in group.sources if s.tp_rank == me]
        for work in sends:
            work.wait()
        return
    assert out is not None
    staging.reset()
    pending, staged = [], []
    for source in group.sources:
        if source.tp_rank == 0:
            continue
        dst = source.piece.hf_view(out[source.hf_name])
        # a piece travels on its parameter's device (NCCL on GPU); one for host memory lands in staging first
        direct = source.in_place and dst.device == params[source.param].device
        buffer = dst if direct else staging.tensor(_meg_shape(source, params), dst.dtype)
        pending.append(dist.irecv(buffer, src=_peer(groups, source.tp_rank), group=groups.tp_group))
        if not direct:
            staged.append((buffer, dst))
    for source in group.sources:
        if source.tp_rank == 0:
            source.piece.hf_view(out[source.hf_name]).copy_(source.piece.meg_view(params[source.param].detach()))
    for work in pending:
        work.wait()
    for buffer, dst in staged:
        dst.copy_(buffer)


@torch.no_grad()
def place_own_pieces(model: torch.nn.Module, group: HFGroup, out: Mapping[str, torch.Tensor], *,
                     params: Mapping[str, torch.Tensor]) -> None:
    """Copy this TP rank's pieces of ``group`` into ``out`` — views of one buffer every TP rank of the stage
    writes into (host shared memory): the gather without communication (replicated pieces: TP rank 0)."""
    me = model.groups.tp_rank
    for source in group.sources:
        if source.tp_rank == me:
            source.piece.hf_view(out[source.hf_name]).copy_(source.piece.meg_view(params[source.param].detach()))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (the device its TP peers send pieces from)."""
    return next(model.parameters()).device


def staging_bytes(plan: Sequence[HFGroup], params: Mapping[str, torch.Tensor]) -> int:
    """Staging ``gather_group`` needs for the largest group of ``plan`` (column blocks of peers' shards)."""
    most = 0
    for group in plan:
        total = 0
        for source in group.sources:
            if source.tp_rank and not source.in_place:
                numel = 1
                for size in _meg_shape(source, params):
                    numel *= size
                total += -(-numel * params[source.param].dtype.itemsize // 64) * 64
        most = max(most, total)
    return most


def iter_hf_groups(model: torch.nn.Module, *, shapes_only: bool = False) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(group key, full HF-named tensors) for each group of ``plan_hf_groups``, produced on TP rank 0 (other
    TP ranks take part in the gathers and get nothing); one group in memory at a time.

    ``shapes_only``: the same names, shapes and dtypes as meta tensors, on every rank, without
    communication — computed independently with the reference mappings (``mapping.megatron_layer_to_hf``,
    ``merge_vocab``), so a refit manifest built from it cross-checks the placement pieces."""
    if shapes_only:
        yield from _reference_shapes(model)
        return
    plan = plan_hf_groups(model)
    params = _params(model)
    staging = Staging(staging_bytes(plan, params), device=model_device(model))
    for group in plan:
        out = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in group.tensors} if model.groups.tp_rank == 0 else None
        gather_group(model, group, out, params=params, staging=staging)
        if out is not None:
            yield group.key, out
        del out


def _reference_shapes(model: torch.nn.Module) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    arch, groups = model.arch, model.groups
    params = _params(model)
    lm = M.MEG_LM_PREFIX
    names = M.megatron_layer_names(te_spec=model.te_spec)

    def meta(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    if model.pre_process:
        shards = [meta(params[lm + M.MEG_EMBEDDING])] * groups.dims.tp
        yield "embedding", {M.HF_EMBEDDING: M.merge_vocab(shards, vocab_size=arch.vocab_size)}
        if model.vision_model is not None:
            vision: dict[str, dict[str, torch.Tensor]] = {}
            for name, param in params.items():
                if name.startswith(M.MEG_VISION_PREFIX):
                    hf_name = M.megatron_vision_to_hf(name)
                    vision.setdefault(_vision_group(hf_name), {})[hf_name] = meta(param)
            yield from vision.items()
    dims = M.AttentionDims.of(arch)
    for local, layer in enumerate(M.stage_layers(arch, pp=groups.dims.pp, pp_rank=groups.pp_rank)):
        shard = {key: meta(params[f"{lm}decoder.layers.{local}.{key}"]) for key in names.values()}
        hf_layer = M.megatron_layer_to_hf([shard] * groups.dims.tp, dims=dims, te_spec=model.te_spec)
        yield f"layers.{layer}", {M.hf_layer_prefix(layer) + k: v for k, v in hf_layer.items()}
    if model.post_process:
        yield "final_norm", {M.HF_FINAL_NORM: meta(params[lm + M.MEG_FINAL_NORM])}
        if not arch.tie_word_embeddings:
            shards = [meta(params[lm + M.MEG_OUTPUT])] * groups.dims.tp
            yield "lm_head", {M.HF_OUTPUT: M.merge_vocab(shards, vocab_size=arch.vocab_size)}


def _file_of(key: str, num_layers: int) -> str:
    total = num_layers + 2
    if key.startswith("layers."):
        return f"model-{int(key.split('.')[1]) + 2:05d}-of-{total:05d}.safetensors"
    if key in ("final_norm", "lm_head"):
        return f"model-{total:05d}-of-{total:05d}.safetensors"
    return f"model-00001-of-{total:05d}.safetensors"


def iter_hf_files(model: torch.nn.Module) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, HF tensors) for the files this stage owns, produced on TP rank 0; other TP ranks take
    part in the gathers and get nothing. File 1: embeddings + vision; 2..L+1: layers; L+2: norm + head.
    The groups of ``iter_hf_groups``, merged per file (a file's tensors are in memory together)."""
    current: str | None = None
    tensors: dict[str, torch.Tensor] = {}
    for key, group in iter_hf_groups(model):
        file_name = _file_of(key, model.arch.num_layers)
        if current is not None and file_name != current:
            yield current, tensors
            tensors = {}
        current = file_name
        tensors.update(group)
        del group
    if current is not None:
        yield current, tensors


def _write_tensor(model: torch.nn.Module, group: HFGroup, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  handle, *, params: Mapping[str, torch.Tensor], staging: Staging, assembly: Staging) -> None:
    """Collective over the TP group: TP rank 0 appends tensor ``name`` to ``handle``. Row-wise tensors are
    written piece by piece (its own from its parameters, peers' through the staging buffer, one chunk at a
    time); others are gathered whole into staging first (at most one layer tensor)."""
    groups = model.groups
    me = groups.tp_rank
    sources = [s for s in group.sources if s.hf_name == name]
    if not all(s.in_place for s in sources):
        single = HFGroup(group.key, ((name, shape, dtype),), tuple(sources))
        if me == 0:
            assembly.reset()
            full = assembly.tensor(shape, dtype)  # at most one layer tensor (a row-parallel matrix)
            gather_group(model, single, {name: full}, params=params, staging=staging)
            handle.write(tensor_bytes(full))
        else:
            gather_group(model, single, None, params=params, staging=staging)
        return
    with torch.no_grad():
        for source in sources:
            view = source.piece.meg_view(params[source.param].detach())
            if source.tp_rank == me == 0:
                handle.write(tensor_bytes(view))
            elif source.tp_rank == me:
                dist.send(view, dst=_peer(groups, 0), group=groups.tp_group)
            elif me == 0:
                staging.reset()
                buffer = staging.tensor(view.shape, dtype)  # on the parameters' device, as the peer sends
                dist.recv(buffer, src=_peer(groups, source.tp_rank), group=groups.tp_group)
                handle.write(tensor_bytes(buffer))


def export_hf_weights(model: torch.nn.Module, out_dir: str | Path) -> None:
    """Write the model's weights as sharded HF safetensors into ``out_dir`` (all ranks call this). TP rank 0
    of each pipeline stage (of DP rank 0) writes its stage's files tensor by tensor as they are gathered."""
    out = Path(out_dir)
    plan = plan_hf_groups(model)
    params = _params(model)
    staging, assembly = Staging(device=model_device(model)), Staging()
    if model.groups.dp_rank != 0:  # DP replicas hold the same weights: DP rank 0's TP groups write them
        plan = []
    writer = model.groups.tp_rank == 0 and model.groups.dp_rank == 0
    files: dict[str, list[HFGroup]] = {}
    for group in plan:
        files.setdefault(_file_of(group.key, model.arch.num_layers), []).append(group)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for file_name, file_groups in files.items():
        tensors = [tensor for group in file_groups for tensor in group.tensors]
        handle = None
        if writer:
            head, _ = safetensors_header(tensors, metadata={"format": "pt"})
            handle = open(out / file_name, "wb")  # noqa: SIM115 - closed below, after the collective writes
            handle.write(head)
        try:
            for group in file_groups:
                for name, shape, dtype in group.tensors:
                    _write_tensor(model, group, name, shape, dtype, handle, params=params, staging=staging,
                                  assembly=assembly)
        finally:
            if handle is not None:
                handle.close()
        if writer:
            weight_map.update({name: file_name for name, _, _ in tensors})
            total_bytes += sum(group.nbytes for group in file_groups)
    gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(gathered, (weight_map, total_bytes))
    else:
        gathered = [(weight_map, total_bytes)]
    if not dist.is_initialized() or dist.get_rank() == 0:
        merged = {name: file for part, _ in gathered for name, file in part.items()}
        index = {"metadata": {"total_size": sum(size for _, size in gathered)},
                 "weight_map": dict(sorted(merged.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
