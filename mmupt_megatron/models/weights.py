"""HF safetensors <-> a (TP/PP-sharded) Megatron model on this rank: loading here, the way back in
``models.hf_gather`` (re-exported), the file I/O in ``models.safetensors_io``.

Both directions place data by ``mapping.layer_pieces`` / ``mapping.vocab_piece``: slices that are plain in
both layouts, so no fused (QKV, gate/up) or full-vocabulary intermediate is ever built. Loading reads each
piece with plain file reads straight into the parameter (no memory map, so no file pages in this
process's RSS); only column blocks of row-parallel tensors (o_proj, down_proj at TP > 1) and dtype casts go
through one reusable staging tensor. Extra memory: about one HF tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmupt_megatron.models import mapping as M
from mmupt_megatron.models.hf_config import LMArch
from mmupt_megatron.models.hf_gather import (  # noqa: F401 - re-exported: the export side
    DEFAULT_CHUNK_BYTES,
    INDEX_FILE,
    HFGroup,
    Source,
    export_hf_weights,
    gather_group,
    iter_hf_files,
    iter_hf_groups,
    plan_hf_groups,
    staging_bytes,
)
from mmupt_megatron.models.mapping import stage_layers
from mmupt_megatron.models.safetensors_io import (  # noqa: F401 - re-exported
    ST_DTYPES,
    TORCH_DTYPES,
    HFWeights,
    Staging,
    tensor_bytes,
)


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _hf_contiguous(piece: M.Piece, hf_shape) -> bool:
    return piece.dim == 0 or piece.size == hf_shape[piece.dim]


def _check_shape(hf: HFWeights, name: str, expected, param_name: str) -> None:
    got = hf.shape(name)
    if tuple(got) != tuple(expected):
        raise ValueError(f"{param_name}: checkpoint tensor {name} has shape {tuple(got)}, the model needs {tuple(expected)}")


def _read_piece(hf: HFWeights, name: str, piece: M.Piece, param: torch.Tensor, staging: Staging,
                cache: dict[str, torch.Tensor]) -> None:
    """Copy the HF slice ``piece`` of tensor ``name`` into its place in ``param``: read in place when the
    slice is contiguous in the file and the dtypes agree, else through the staging tensor (the whole HF
    tensor, kept in ``cache`` for the other pieces of the same tensor)."""
    dst = piece.meg_view(param.data)
    if _hf_contiguous(piece, hf.shape(name)) and hf.dtype(name) == param.dtype:
        hf.read_rows_into(name, piece.hf_start if piece.dim == 0 else 0, dst)
        return
    if name not in cache:
        cache.clear()
        staging.reset()
        full = staging.tensor(hf.shape(name), hf.dtype(name))
        hf.read_rows_into(name, 0, full)
        cache[name] = full
    dst.copy_(piece.hf_view(cache[name]))


def _read_vocab(hf: HFWeights, name: str, param_name: str, param: torch.Tensor, arch: LMArch, padded: int,
                tp: int, tp_rank: int, staging: Staging) -> None:
    if hf.num_rows(name) != arch.vocab_size:
        raise ValueError(f"{hf.folder}: {name} has {hf.num_rows(name)} rows, config vocab_size={arch.vocab_size}")
    if tuple(param.shape) != (padded // tp, *hf.shape(name)[1:]):
        raise ValueError(f"{param_name}: checkpoint shape {hf.shape(name)} (vocab padded to {padded} over tp={tp}) "
                         f"does not fit model shape {tuple(param.shape)}")
    piece = M.vocab_piece(name, param_name, vocab_size=arch.vocab_size, padded_vocab=padded, tp=tp, tp_rank=tp_rank)
    size = 0 if piece is None else piece.size
    param.data[size:].zero_()  # vocabulary padding
    if piece is None:
        return
    if hf.dtype(name) == param.dtype:
        hf.read_rows_into(name, piece.hf_start, piece.meg_view(param.data))
        return
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, param[0].numel() * hf.dtype(name).itemsize))
    for start in range(0, size, rows):  # a dtype cast: through staging, chunk by chunk
        staging.reset()
        part = staging.tensor((min(rows, size - start), *param.shape[1:]), hf.dtype(name))
        hf.read_rows_into(name, piece.hf_start + start, part)
        param.data[start : start + part.shape[0]].copy_(part)


def _read_whole(hf: HFWeights, name: str, param_name: str, param: torch.Tensor, staging: Staging) -> None:
    _check_shape(hf, name, param.shape, param_name)
    if param.dim() == 0 or hf.dtype(name) != param.dtype:
        param.data.copy_(hf.get(name))
        return
    hf.read_rows_into(name, 0, param.data)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Fill ``model`` (a ``Qwen2_5_VLModel``) with this rank's shard of the HF checkpoint in ``hf_dir``."""
    arch, groups = model.arch, model.groups
    tp, tp_rank = groups.dims.tp, groups.tp_rank
    params = _params(model)
    lm = M.MEG_LM_PREFIX
    dims = M.AttentionDims.of(arch)
    pieces = M.layer_pieces(dims, ffn_hidden_size=arch.ffn_hidden_size, hidden_size=arch.hidden_size, tp=tp,
                            tp_rank=tp_rank, te_spec=model.te_spec)
    hf_shapes = M.hf_layer_shapes(dims, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size)
    slot_of = {piece.hf_key: piece.meg_key for piece in pieces}
    staging = Staging()
    loaded: set[str] = set()
    with HFWeights(hf_dir) as hf:
        for local, layer in enumerate(stage_layers(arch, pp=groups.dims.pp, pp_rank=groups.pp_rank)):
            prefix, meg = M.hf_layer_prefix(layer), f"{lm}decoder.layers.{local}."
            for key, shape in hf_shapes.items():
                _check_shape(hf, prefix + key, shape, meg + slot_of[key])
            cache: dict[str, torch.Tensor] = {}
            for piece in pieces:
                name = meg + piece.meg_key
                if name not in params:
                    raise ValueError(f"{hf_dir}: the model has no parameter {name} for {prefix + piece.hf_key}")
                _read_piece(hf, prefix + piece.hf_key, piece, params[name], staging, cache)
                loaded.add(name)
        padded = model.padded_vocab
        if model.pre_process:
            name = lm + M.MEG_EMBEDDING
            _read_vocab(hf, M.HF_EMBEDDING, name, params[name], arch, padded, tp, tp_rank, staging)
            loaded.add(name)
            if model.vision_model is not None:
                for hf_name in (n for n in hf.names() if n.startswith(M.HF_VISION_PREFIX)):
                    name = M.hf_vision_to_megatron(hf_name)
                    if name not in params:
                        raise ValueError(f"{hf_dir}: vision tensor {hf_name} has no parameter in the vision tower")
                    _read_whole(hf, hf_name, name, params[name], staging)
                    loaded.add(name)
        if model.post_process:
            name = lm + M.MEG_FINAL_NORM
            _read_whole(hf, M.HF_FINAL_NORM, name, params[name], staging)
            loaded.add(name)
            output = lm + M.MEG_OUTPUT
            if output in params:  # untied, or tied under PP (the last stage keeps a copy)
                source = M.HF_EMBEDDING if arch.tie_word_embeddings else M.HF_OUTPUT
                _read_vocab(hf, source, output, params[output], arch, padded, tp, tp_rank, staging)
                loaded.add(output)
    # Every element of every layer parameter is covered by exactly one piece (tests/models/
    # test_mapping_pieces_on_cpu.py); a parameter no piece names would stay unset:
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{hf_dir}: no HF weights for model parameters {missing[:6]}")
