"""Read a Hugging Face Qwen2 / Qwen2.5-VL checkpoint folder's config.json into a small typed ``LMArch``.

Accepts both the hub's flat Qwen2.5-VL layout (text fields at the top level, ``rope_scaling`` with
``mrope_section``) and transformers 5's nested ``text_config`` with ``rope_parameters``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_5_vl")


@dataclass(kw_only=True, frozen=True)
class LMArch:
    model_type: str
    """``qwen2`` (text only) or ``qwen2_5_vl``."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = True
    """Qwen2 attention has biases on q/k/v and none on o_proj."""
    mrope_section: tuple[int, ...] | None = None
    """Channels (in pairs) of the temporal/height/width rotary sections; None for text-only Qwen2."""
    max_position_embeddings: int = 32768
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_config: dict[str, Any] | None = field(default=None, compare=False)
    """The raw HF vision_config dict (None for text-only)."""

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None

    @property
    def spatial_merge_size(self) -> int:
        assert self.vision_config is not None
        return int(self.vision_config.get("spatial_merge_size", 2))


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of ``folder`` as a dict; ValueError naming the folder when it is missing."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a Hugging Face checkpoint folder: {path} does not exist")
    return json.loads(path.read_text())


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of ``folder`` (ValueError naming the folder when there are none)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in Path(folder).glob("*.bin"))
        hint = f" (found {bins}; convert them to safetensors first)" if bins else ""
        raise ValueError(f"no *.safetensors weights in {folder}{hint}")
    return files


def load_arch(folder: str | Path, *, require_weights: bool = True) -> LMArch:
    """Parse ``folder``/config.json; ValueError if it is not a Qwen2 / Qwen2.5-VL checkpoint."""
    raw = read_hf_config(folder)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{folder} is not a Qwen2 / Qwen2.5-VL checkpoint: config.json has model_type={model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if require_weights:
        safetensors_files(folder)
    text = dict(raw)
    if model_type == "qwen2_5_vl" and isinstance(raw.get("text_config"), dict):
        text = {**raw, **raw["text_config"]}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if key not in text]
    if missing:
        raise ValueError(f"{folder}/config.json lacks {missing}")
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    mrope = rope.get("mrope_section")
    if model_type == "qwen2_5_vl" and mrope is None:
        raise ValueError(f"{folder}/config.json: qwen2_5_vl without rope mrope_section")
    head_dim = int(text.get("head_dim") or hidden // heads)
    if mrope is not None and 2 * sum(mrope) != head_dim:
        raise ValueError(f"{folder}/config.json: mrope_section {mrope} does not sum to head_dim/2 = {head_dim // 2}")
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vision = raw.get("vision_config") if model_type == "qwen2_5_vl" else None
    return LMArch(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(tie),
        mrope_section=tuple(int(x) for x in mrope) if mrope is not None else None,
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        image_token_id=raw.get("image_token_id"),
        video_token_id=raw.get("video_token_id"),
        vision_start_token_id=raw.get("vision_start_token_id"),
        vision_config=dict(vision) if vision is not None else None,
    )
