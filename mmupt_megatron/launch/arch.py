"""Architectures of the Qwen2.5-VL family, for the planner: a small table and exact parameter counts.

Source of the numbers: the ``config.json`` of each Hugging Face checkpoint ``Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-
Instruct`` (text: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
vocab_size, tie_word_embeddings; vision_config: depth 32, hidden_size 1280, intermediate_size, out_hidden_size).
The 32B and 72B language models have the Qwen2.5-32B / -72B shapes. Vision intermediate_size is 3420 for 3B/7B
and 3456 for 32B/72B (the latter from memory of the 32B/72B configs: it moves the ViT count by ~0.3%).
The counts below reproduce the sizes the model cards report (3.75B, 8.29B, 33.5B, 73.4B; checked in
tests/launch/test_planner_on_cpu.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class QwenVLArch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    vit_hidden: int = 1280
    vit_layers: int = 32
    vit_ffn: int = 3420
    vit_patch: int = 14
    vit_merge: int = 2  # 2x2 patches merge into one LM token

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: q/k/v (with biases), o, SwiGLU gate/up/down, two RMSNorms."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        attention = h * (h + 2 * kv) + (h + 2 * kv) + h * h
        return attention + 3 * h * f + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def lm_params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def vision_params(self) -> int:
        """ViT: patch conv, blocks (qkv+proj with biases, SwiGLU with biases, 2 norms), merger MLP to the LM."""
        v, f, merged = self.vit_hidden, self.vit_ffn, self.vit_hidden * self.vit_merge**2
        patch = 3 * 2 * self.vit_patch**2 * v  # Conv3d over 2 frames, no bias
        block = (v * 3 * v + 3 * v) + (v * v + v) + (3 * v * f + 2 * f + v) + 2 * v
        merger = v + (merged * merged + merged) + (merged * self.hidden + self.hidden)
        return patch + self.vit_layers * block + merger

    @property
    def total_params(self) -> int:
        return self.lm_params + self.vision_params

    def kv_bytes_per_token(self, *, tp: int, dtype_bytes: int = 2) -> float:
        """K and V of every layer for one token on one of ``tp`` GPUs (KV heads replicate when tp > kv_heads)."""
        heads_per_gpu = max(1, self.kv_heads // tp) if tp <= self.kv_heads else 1
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes


QWEN2_5_VL = {
    "qwen2.5-vl-3b": QwenVLArch(name="qwen2.5-vl-3b", hidden=2048, layers=36, heads=16, kv_heads=2, ffn=11008,
                                vocab=151936, tied_embeddings=True),
    "qwen2.5-vl-7b": QwenVLArch(name="qwen2.5-vl-7b", hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944,
                                vocab=152064, tied_embeddings=False),
    "qwen2.5-vl-32b": QwenVLArch(name="qwen2.5-vl-32b", hidden=5120, layers=64, heads=40, kv_heads=8, ffn=27648,
                                 vocab=152064, tied_embeddings=False, vit_ffn=3456),
    "qwen2.5-vl-72b": QwenVLArch(name="qwen2.5-vl-72b", hidden=8192, layers=80, heads=64, kv_heads=8, ffn=29568,
                                 vocab=152064, tied_embeddings=False, vit_ffn=3456),
}


def arch_for(*, model_path: str, model: str = "") -> QwenVLArch:
    """The architecture named by ``model`` (a table key) or guessed from the size in ``model.path``."""
    if model:
        if model not in QWEN2_5_VL:
            raise ValueError(f"--model {model!r} is not one of {sorted(QWEN2_5_VL)}")
        return QWEN2_5_VL[model]
    match = re.search(r"(\d+)[bB]", model_path.rstrip("/").rsplit("/", 1)[-1])
    key = f"qwen2.5-vl-{match.group(1)}b" if match else ""
    if key not in QWEN2_5_VL:
        raise ValueError(
            f"cannot tell the model size from model.path={model_path!r}; pass --model one of {sorted(QWEN2_5_VL)}"
        )
    return QWEN2_5_VL[key]
