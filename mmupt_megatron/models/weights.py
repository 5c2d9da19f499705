"""Stream HF safetensors weights into a (TP/PP-sharded) Megatron model on this rank, and back out.

Loading reads one decoder layer at a time through memory-mapped ``safe_open`` handles and copies this
rank's shard into the parameters, so the extra memory is about one layer. Exporting gathers one layer's TP
shards on TP rank 0 of each pipeline stage, maps them to HF names and writes that layer to its own
safetensors file; rank 0 writes ``model.safetensors.index.json``. Peak: the model shard plus one layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from mmupt_megatron.models import mapping as M
from mmupt_megatron.models.hf_config import LMArch, safetensors_files

INDEX_FILE = "model.safetensors.index.json"


class HFWeights:
    """Name-normalised access to the tensors of an HF checkpoint folder (single or sharded files).

    Each read opens its file, copies the requested tensor (or rows) out of the memory map and closes it
    again, so touched file pages do not accumulate in this process's RSS across a whole conversion."""

    def __init__(self, folder: str | Path) -> None:
        self._where: dict[str, tuple[str, str]] = {}
        for path in safetensors_files(folder):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    self._where[M.normalize_hf_name(name)] = (str(path), name)
        self.folder = Path(folder)

    def names(self) -> list[str]:
        return list(self._where)

    def _locate(self, name: str) -> tuple[str, str]:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} not found in the safetensors of {self.folder}")
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        path, raw = self._locate(name)
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(raw).clone()

    def num_rows(self, name: str) -> int:
        path, raw = self._locate(name)
        with safe_open(path, framework="pt") as handle:
            return handle.get_slice(raw).get_shape()[0]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor; rows past its end come back as zeros (vocab padding)."""
        path, raw = self._locate(name)
        with safe_open(path, framework="pt") as handle:
            view = handle.get_slice(raw)
            total, width = view.get_shape()
            part = view[min(start, total) : min(stop, total)].clone()
        if part.shape[0] < stop - start:
            part = torch.cat([part, part.new_zeros(stop - start - part.shape[0], width)])
        return part.contiguous()

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_layers(arch: LMArch, *, pp: int, pp_rank: int) -> range:
    """Global indices of the decoder layers held by pipeline stage ``pp_rank``."""
    per_stage = arch.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _copy(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _vocab_rows(hf: HFWeights, name: str, arch: LMArch, padded: int, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's rows of a vocabulary-parallel tensor, read without loading the whole matrix
    (the same result as ``mapping.split_vocab(full, tp=tp, padded_vocab=padded)[tp_rank]``)."""
    if hf.num_rows(name) != arch.vocab_size:
        raise ValueError(f"{hf.folder}: {name} has {hf.num_rows(name)} rows, config vocab_size={arch.vocab_size}")
    rows = padded // tp
    return hf.get_rows(name, tp_rank * rows, (tp_rank + 1) * rows)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Fill ``model`` (a ``Qwen2_5_VLModel``) with this rank's shard of the HF checkpoint in ``hf_dir``."""
    arch, groups = model.arch, model.groups
    tp, tp_rank = groups.dims.tp, groups.tp_rank
    params = _params(model)
    lm = M.MEG_LM_PREFIX
    dims = M.AttentionDims.of(arch)
    loaded: set[str] = set()
    with HFWeights(hf_dir) as hf:
        for local, layer in enumerate(stage_layers(arch, pp=groups.dims.pp, pp_rank=groups.pp_rank)):
            prefix = M.hf_layer_prefix(layer)
            hf_layer = {key: hf.get(prefix + key) for key in M.HF_LAYER_KEYS}
            shard = M.hf_layer_to_megatron(hf_layer, dims=dims, tp=tp, te_spec=model.te_spec)[tp_rank]
            for key, value in shard.items():
                name = f"{lm}decoder.layers.{local}.{key}"
                _copy(params[name], value, name)
                loaded.add(name)
            del hf_layer, shard
        padded = model.padded_vocab
        if model.pre_process:
            name = lm + M.MEG_EMBEDDING
            _copy(params[name], _vocab_rows(hf, M.HF_EMBEDDING, arch, padded, tp, tp_rank), name)
            loaded.add(name)
            if model.vision_model is not None:
                for hf_name in (n for n in hf.names() if n.startswith(M.HF_VISION_PREFIX)):
                    name = M.hf_vision_to_megatron(hf_name)
                    if name not in params:
                        raise ValueError(f"{hf_dir}: vision tensor {hf_name} has no parameter in the vision tower")
                    _copy(params[name], hf.get(hf_name), name)
                    loaded.add(name)
        if model.post_process:
            name = lm + M.MEG_FINAL_NORM
            _copy(params[name], hf.get(M.HF_FINAL_NORM), name)
            loaded.add(name)
            output = lm + M.MEG_OUTPUT
            if output in params:  # untied, or tied under PP (the last stage keeps a copy)
                source = M.HF_EMBEDDING if arch.tie_word_embeddings else M.HF_OUTPUT
                _copy(params[output], _vocab_rows(hf, source, arch, padded, tp, tp_rank), output)
                loaded.add(output)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{hf_dir}: no HF weights for model parameters {missing[:6]}")


def _gather_tp(tensor: torch.Tensor, groups, *, shapes_only: bool = False) -> list[torch.Tensor] | None:
    """All TP shards of ``tensor`` on TP rank 0 (None elsewhere). ``shapes_only``: meta tensors of the
    shards' shapes on every rank, without communication."""
    if shapes_only:
        return [torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")] * groups.dims.tp
    tensor = tensor.detach().contiguous()
    if groups.dims.tp == 1:
        return [tensor]
    # Point-to-point rather than dist.gather: rank 0 keeps its own shard as it is instead of copying it
    # into a gather list (one shard less of transient memory per tensor).
    dst = dist.get_global_rank(groups.tp_group, 0)
    if groups.tp_rank != 0:
        dist.send(tensor, dst=dst, group=groups.tp_group)
        return None
    parts = [tensor] + [torch.empty_like(tensor) for _ in range(groups.dims.tp - 1)]
    for peer in range(1, groups.dims.tp):
        dist.recv(parts[peer], src=dist.get_global_rank(groups.tp_group, peer), group=groups.tp_group)
    return parts


def _replicated(param: torch.Tensor, shapes_only: bool) -> torch.Tensor:
    if shapes_only:
        return torch.empty(param.shape, dtype=param.dtype, device="meta")
    return param.detach().contiguous()


def _vision_group(hf_name: str) -> str:
    """The unit a vision tensor belongs to: ``visual.blocks.N`` for a block, else ``visual.<module>``."""
    parts = hf_name.split(".")
    return ".".join(parts[:3]) if parts[1] == "blocks" else ".".join(parts[:2])


def iter_hf_groups(model: torch.nn.Module, *, shapes_only: bool = False) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(group key, full HF-named tensors) for each whole layer this pipeline stage owns, in a fixed order:
    ``embedding``, the vision units (``visual.patch_embed``, ``visual.blocks.N``, ``visual.merger``),
    ``layers.N`` (global index), ``final_norm``, ``lm_head``. A group holds every tensor a serving engine
    fuses together (q/k/v, gate/up), so it can be loaded on its own.

    Produced on TP rank 0 after TP gathers (QKV / gate-up un-fused by ``mapping.megatron_layer_to_hf``);
    other TP ranks take part in the gathers and get nothing. ``shapes_only``: the same names, shapes and
    dtypes as meta tensors, on every rank, without communication (a manifest before any gather)."""
    arch, groups = model.arch, model.groups
    params = _params(model)
    lm = M.MEG_LM_PREFIX
    dims = M.AttentionDims.of(arch)
    names = M.megatron_layer_names(te_spec=model.te_spec)
    owner = shapes_only or groups.tp_rank == 0
    if model.pre_process:
        embedding = _gather_tp(params[lm + M.MEG_EMBEDDING], groups, shapes_only=shapes_only)
        if owner:
            yield "embedding", {M.HF_EMBEDDING: M.merge_vocab(embedding, vocab_size=arch.vocab_size)}
        del embedding
        if model.vision_model is not None and owner:
            vision: dict[str, dict[str, torch.Tensor]] = {}
            for name, param in params.items():
                if name.startswith(M.MEG_VISION_PREFIX):
                    hf_name = M.megatron_vision_to_hf(name)
                    vision.setdefault(_vision_group(hf_name), {})[hf_name] = _replicated(param, shapes_only)
            yield from vision.items()
    for local, layer in enumerate(stage_layers(arch, pp=groups.dims.pp, pp_rank=groups.pp_rank)):
        gathered = {
            key: _gather_tp(params[f"{lm}decoder.layers.{local}.{key}"], groups, shapes_only=shapes_only)
            for key in names.values()
        }
        if owner:
            shards = [{key: parts[rank] for key, parts in gathered.items()} for rank in range(groups.dims.tp)]
            hf_layer = M.megatron_layer_to_hf(shards, dims=dims, te_spec=model.te_spec)
            yield f"layers.{layer}", {M.hf_layer_prefix(layer) + k: v for k, v in hf_layer.items()}
        del gathered
    if model.post_process:
        if owner:
            yield "final_norm", {M.HF_FINAL_NORM: _replicated(params[lm + M.MEG_FINAL_NORM], shapes_only)}
        if not arch.tie_word_embeddings:
            output = _gather_tp(params[lm + M.MEG_OUTPUT], groups, shapes_only=shapes_only)
            if owner:
                yield "lm_head", {M.HF_OUTPUT: M.merge_vocab(output, vocab_size=arch.vocab_size)}


def _layer_file(layer: int, total: int) -> str:
    return f"model-{layer + 2:05d}-of-{total:05d}.safetensors"


def iter_hf_files(model: torch.nn.Module) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, HF tensors) for the files this stage owns, produced on TP rank 0; other TP ranks take
    part in the gathers and get nothing. File 1: embeddings + vision; 2..L+1: layers; L+2: norm + head.
    The groups of ``iter_hf_groups``, merged per file."""
    total = model.arch.num_layers + 2
    current: str | None = None
    tensors: dict[str, torch.Tensor] = {}
    for key, group in iter_hf_groups(model):
        if key.startswith("layers."):
            file_name = _layer_file(int(key.split(".")[1]), total)
        elif key in ("final_norm", "lm_head"):
            file_name = f"model-{total:05d}-of-{total:05d}.safetensors"
        else:
            file_name = f"model-00001-of-{total:05d}.safetensors"
        if current is not None and file_name != current:
            yield current, tensors
            tensors = {}
        current = file_name
        tensors.update(group)
        del group
    if current is not None:
        yield current, tensors


def export_hf_weights(model: torch.nn.Module, out_dir: str | Path) -> None:
    """Write the model's weights as sharded HF safetensors into ``out_dir`` (all ranks call this)."""
    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for file_name, tensors in iter_hf_files(model):
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
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
