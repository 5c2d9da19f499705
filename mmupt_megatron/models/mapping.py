"""Pure HF <-> Megatron-Core parameter mapping for Qwen2 / Qwen2.5-VL (no megatron import).

Megatron layouts (see /work/shared/STACK.md):
- ``linear_qkv`` holds Q, K, V interleaved per KV group: for each group, its q heads, then k, then v
  (weights [rows, hidden] and biases [rows] alike); TP splits by whole groups, i.e. contiguous chunks.
- ``linear_fc1`` holds [gate; up]; under TP rank i holds [gate_i; up_i].
- Column-parallel (qkv, fc1, embedding, output layer) split dim 0; row-parallel (``linear_proj`` =
  o_proj, ``linear_fc2`` = down_proj) split dim 1. Norms and the vision tower are replicated; vision
  weights keep their HF names under ``vision_model.``.
- Vocabulary-parallel tensors are padded with zero rows to a multiple of lcm(128, TP) (the same global
  shape at every TP degree), and the padding is stripped on the way back.
Every chunk returned is ``.contiguous()`` (gloo scatters of non-contiguous views send wrong data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mmupt_megatron.models.hf_config import LMArch

Tensor = torch.Tensor

HF_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT = "lm_head.weight"
HF_VISION_PREFIX = "visual."
MEG_LM_PREFIX = "language_model."
MEG_VISION_PREFIX = "vision_model."
MEG_EMBEDDING = "embedding.word_embeddings.weight"
MEG_FINAL_NORM = "decoder.final_layernorm.weight"
MEG_OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class AttentionDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, arch: LMArch) -> AttentionDims:
        return cls(arch.num_attention_heads, arch.num_kv_heads, arch.head_dim)


def stage_layers(arch: LMArch, *, pp: int, pp_rank: int) -> range:
    """Global indices of the decoder layers held by pipeline stage ``pp_rank``."""
    per_stage = arch.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def megatron_layer_names(*, te_spec: bool) -> dict[str, str]:
    """Megatron name (relative to ``decoder.layers.N.``) of each fused/renamed tensor slot."""
    return {
        "input_norm": "self_attention.linear_qkv.layer_norm_weight" if te_spec else "input_layernorm.weight",
        "pre_mlp_norm": "mlp.linear_fc1.layer_norm_weight" if te_spec else "pre_mlp_layernorm.weight",
        "qkv_weight": "self_attention.linear_qkv.weight",
        "qkv_bias": "self_attention.linear_qkv.bias",
        "proj": "self_attention.linear_proj.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }


# ---------------------------------------------------------------- elementary reshapes


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, dims: AttentionDims) -> Tensor:
    """[q; k; v] (HF, separate) -> per-KV-group [q_g; k_g; v_g] along dim 0 (weights or biases)."""
    groups, hd = dims.num_kv_heads, dims.head_dim
    tail = q.shape[1:]
    q_g = q.reshape(groups, (dims.num_heads // groups) * hd, *tail)
    k_g = k.reshape(groups, hd, *tail)
    v_g = v.reshape(groups, hd, *tail)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *tail)


def split_qkv(qkv: Tensor, dims: AttentionDims) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``interleave_qkv`` (also valid on one TP shard with dims divided by TP)."""
    groups, hd = dims.num_kv_heads, dims.head_dim
    q_rows = (dims.num_heads // groups) * hd
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, q_rows + 2 * hd, *tail)
    q, k, v = grouped.split([q_rows, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def split_tp(tensor: Tensor, *, tp: int, dim: int) -> list[Tensor]:
    """Equal contiguous chunks along ``dim`` (ValueError if it does not divide)."""
    if tensor.shape[dim] % tp:
        raise ValueError(f"cannot split dim {dim} of size {tensor.shape[dim]} into tp={tp} parts")
    return [chunk.contiguous() for chunk in tensor.chunk(tp, dim=dim)]


def merge_tp(shards: Sequence[Tensor], *, dim: int) -> Tensor:
    return torch.cat(list(shards), dim=dim).contiguous()


def split_fc1(gate: Tensor, up: Tensor, *, tp: int) -> list[Tensor]:
    """[gate; up] -> per rank [gate_i; up_i]."""
    return [torch.cat([g, u], dim=0).contiguous() for g, u in zip(split_tp(gate, tp=tp, dim=0), split_tp(up, tp=tp, dim=0))]


def merge_fc1(shards: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    halves = [shard.chunk(2, dim=0) for shard in shards]
    return merge_tp([h[0] for h in halves], dim=0), merge_tp([h[1] for h in halves], dim=0)


def padded_vocab_size(vocab_size: int, *, tp: int, multiple: int = 128) -> int:
    """Smallest size >= vocab_size divisible by lcm(multiple, tp). A TP-independent multiple keeps the
    global shape of vocabulary tensors the same at every TP degree, so checkpoints reshard freely."""
    step = math.lcm(multiple, tp)
    return -(-vocab_size // step) * step


def split_vocab(weight: Tensor, *, tp: int, padded_vocab: int) -> list[Tensor]:
    """Pad rows with zeros to ``padded_vocab`` (a multiple of ``tp``) and split dim 0."""
    if padded_vocab < weight.shape[0] or padded_vocab % tp:
        raise ValueError(f"padded_vocab={padded_vocab} must be >= {weight.shape[0]} and divisible by tp={tp}")
    pad = padded_vocab - weight.shape[0]
    if pad:
        weight = torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])], dim=0)
    return split_tp(weight, tp=tp, dim=0)


def merge_vocab(shards: Sequence[Tensor], *, vocab_size: int) -> Tensor:
    return merge_tp(shards, dim=0)[:vocab_size].contiguous()


# ---------------------------------------------------------------- one decoder layer


def hf_layer_to_megatron(
    hf: Mapping[str, Tensor], *, dims: AttentionDims, tp: int, te_spec: bool = False
) -> list[dict[str, Tensor]]:
    """One HF decoder layer (keys as in ``HF_LAYER_KEYS``) -> one dict per TP rank of Megatron tensors
    (keys relative to ``decoder.layers.N.``)."""
    missing = [key for key in HF_LAYER_KEYS if key not in hf]
    if missing:
        raise ValueError(f"HF layer is missing {missing}")
    names = megatron_layer_names(te_spec=te_spec)
    qkv_w = interleave_qkv(hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"], dims)
    qkv_b = interleave_qkv(hf["self_attn.q_proj.bias"], hf["self_attn.k_proj.bias"], hf["self_attn.v_proj.bias"], dims)
    per_slot = {
        names["qkv_weight"]: split_tp(qkv_w, tp=tp, dim=0),
        names["qkv_bias"]: split_tp(qkv_b, tp=tp, dim=0),
        names["proj"]: split_tp(hf["self_attn.o_proj.weight"], tp=tp, dim=1),
        names["fc1"]: split_fc1(hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"], tp=tp),
        names["fc2"]: split_tp(hf["mlp.down_proj.weight"], tp=tp, dim=1),
        names["input_norm"]: [hf["input_layernorm.weight"].contiguous()] * tp,
        names["pre_mlp_norm"]: [hf["post_attention_layernorm.weight"].contiguous()] * tp,
    }
    return [{name: shards[rank] for name, shards in per_slot.items()} for rank in range(tp)]


def megatron_layer_to_hf(
    shards: Sequence[Mapping[str, Tensor]], *, dims: AttentionDims, te_spec: bool = False
) -> dict[str, Tensor]:
    """Inverse of ``hf_layer_to_megatron``: the per-TP-rank dicts of one layer -> HF tensors."""
    names = megatron_layer_names(te_spec=te_spec)
    tp = len(shards)
    rank_dims = AttentionDims(dims.num_heads // tp, dims.num_kv_heads // tp, dims.head_dim)
    qkv_w = [split_qkv(shard[names["qkv_weight"]], rank_dims) for shard in shards]
    qkv_b = [split_qkv(shard[names["qkv_bias"]], rank_dims) for shard in shards]
    gate, up = merge_fc1([shard[names["fc1"]] for shard in shards])
    out = {
        "input_layernorm.weight": shards[0][names["input_norm"]].contiguous(),
        "post_attention_layernorm.weight": shards[0][names["pre_mlp_norm"]].contiguous(),
        "self_attn.o_proj.weight": merge_tp([shard[names["proj"]] for shard in shards], dim=1),
        "mlp.gate_proj.weight": gate,
        "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": merge_tp([shard[names["fc2"]] for shard in shards], dim=1),
    }
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"self_attn.{proj}.weight"] = merge_tp([parts[index] for parts in qkv_w], dim=0)
        out[f"self_attn.{proj}.bias"] = merge_tp([parts[index] for parts in qkv_b], dim=0)
    return out


# ---------------------------------------------------------------- placement pieces (views, no copies)


@dataclass(frozen=True, slots=True)
class Piece:
    """One block that is a plain slice in both layouts: indices [hf_start, hf_start + size) of HF tensor
    ``hf_key`` along ``dim`` are indices [meg_start, meg_start + size) of one TP rank's Megatron tensor
    ``meg_key`` along the same dim (all other dims whole). ``replicated``: every TP rank holds the same
    values (norms); a gather takes TP rank 0's. A rank's Megatron view is always contiguous (dim 0, or
    dim 1 over the whole shard), so it can be sent or read as it is; the HF view is contiguous unless it
    is a column block (``dim == 1`` and not every column)."""

    hf_key: str
    meg_key: str
    dim: int
    hf_start: int
    meg_start: int
    size: int
    replicated: bool = False

    def hf_view(self, tensor: Tensor) -> Tensor:
        return tensor.narrow(self.dim, self.hf_start, self.size)

    def meg_view(self, tensor: Tensor) -> Tensor:
        return tensor.narrow(self.dim, self.meg_start, self.size)


def hf_layer_shapes(dims: AttentionDims, *, hidden_size: int, ffn_hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF tensors of one decoder layer, in ``HF_LAYER_KEYS`` order."""
    q_rows, kv_rows = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    shapes = {
        "input_layernorm.weight": (hidden_size,), "post_attention_layernorm.weight": (hidden_size,),
        "self_attn.q_proj.weight": (q_rows, hidden_size), "self_attn.k_proj.weight": (kv_rows, hidden_size),
        "self_attn.v_proj.weight": (kv_rows, hidden_size), "self_attn.q_proj.bias": (q_rows,),
        "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.o_proj.weight": (hidden_size, q_rows), "mlp.gate_proj.weight": (ffn_hidden_size, hidden_size),
        "mlp.up_proj.weight": (ffn_hidden_size, hidden_size), "mlp.down_proj.weight": (hidden_size, ffn_hidden_size),
    }
    return {key: shapes[key] for key in HF_LAYER_KEYS}


def layer_pieces(dims: AttentionDims, *, ffn_hidden_size: int, hidden_size: int, tp: int, tp_rank: int,
                 te_spec: bool = False) -> list[Piece]:
    """Where every element of TP rank ``tp_rank``'s shard of one decoder layer sits in the HF layer: the
    same layout as ``hf_layer_to_megatron`` / ``megatron_layer_to_hf``, as slices instead of copies (a
    test checks they agree). Ordered by HF tensor (``HF_LAYER_KEYS``), then by ``hf_start``."""
    if dims.num_kv_heads % tp or ffn_hidden_size % tp or dims.num_heads % dims.num_kv_heads:
        raise ValueError(f"tp={tp} must divide num_kv_heads={dims.num_kv_heads} and ffn={ffn_hidden_size}")
    names = megatron_layer_names(te_spec=te_spec)
    hd = dims.head_dim
    q_rows = (dims.num_heads // dims.num_kv_heads) * hd
    block = q_rows + 2 * hd
    local_groups = dims.num_kv_heads // tp
    ffn = ffn_hidden_size // tp
    width = dims.num_heads * hd // tp
    pieces = [
        Piece("input_layernorm.weight", names["input_norm"], 0, 0, 0, hidden_size, replicated=True),
        Piece("post_attention_layernorm.weight", names["pre_mlp_norm"], 0, 0, 0, hidden_size, replicated=True),
    ]
    for kind, slot in (("weight", "qkv_weight"), ("bias", "qkv_bias")):
        for part, rows, offset in (("q", q_rows, 0), ("k", hd, q_rows), ("v", hd, q_rows + hd)):
            for local in range(local_groups):
                group = tp_rank * local_groups + local
                pieces.append(Piece(f"self_attn.{part}_proj.{kind}", names[slot], 0, group * rows,
                                    local * block + offset, rows))
    pieces += [
        Piece("self_attn.o_proj.weight", names["proj"], 1, tp_rank * width, 0, width),
        Piece("mlp.gate_proj.weight", names["fc1"], 0, tp_rank * ffn, 0, ffn),
        Piece("mlp.up_proj.weight", names["fc1"], 0, tp_rank * ffn, ffn, ffn),
        Piece("mlp.down_proj.weight", names["fc2"], 1, tp_rank * ffn, 0, ffn),
    ]
    order = {key: index for index, key in enumerate(HF_LAYER_KEYS)}
    return sorted(pieces, key=lambda p: (order[p.hf_key], p.hf_start))


def vocab_piece(hf_key: str, meg_key: str, *, vocab_size: int, padded_vocab: int, tp: int, tp_rank: int) -> Piece | None:
    """TP rank ``tp_rank``'s real rows of a vocabulary-parallel tensor (None if its rows are all padding):
    the same layout as ``split_vocab`` / ``merge_vocab``."""
    rows = padded_vocab // tp
    start = tp_rank * rows
    size = min(rows, vocab_size - start)
    return Piece(hf_key, meg_key, 0, start, 0, size) if size > 0 else None


# ---------------------------------------------------------------- non-layer tensors


def hf_vision_to_megatron(name: str) -> str:
    assert name.startswith(HF_VISION_PREFIX), name
    return MEG_VISION_PREFIX + name[len(HF_VISION_PREFIX) :]


def megatron_vision_to_hf(name: str) -> str:
    assert name.startswith(MEG_VISION_PREFIX), name
    return HF_VISION_PREFIX + name[len(MEG_VISION_PREFIX) :]


def normalize_hf_name(name: str) -> str:
    """transformers-5 in-memory names (``model.language_model.*``, ``model.visual.*``) -> hub names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def hf_names_of_layer(layer: int) -> list[str]:
    prefix = hf_layer_prefix(layer)
    return [prefix + key for key in HF_LAYER_KEYS]


def hf_non_layer_names(arch: LMArch) -> list[str]:
    names = [HF_EMBEDDING, HF_FINAL_NORM]
    if not arch.tie_word_embeddings:
        names.append(HF_OUTPUT)
    return names
