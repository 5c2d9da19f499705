"""The demo's model: a stock ``Qwen2_5_VLForConditionalGeneration`` built from a small config, and the
batching that turns world examples into its inputs (prompts, labels, pixel values, mm token types).

Sizes follow /work/shared/DEMO.md: text hidden 128, 2 layers, 2 heads of head_dim 64 (vLLM's CPU backend
needs 64), MLP 256; a small vision tower (below). With 84 x 84 images each of the 9 grid cells is
one merged image token. The vision tower is one full-attention block of width 64 (one head of 64): a
2-block width-128 tower doubled the step time (0.25 -> 0.16 s for batch 64 on one thread). fp32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.prompts import DEFAULT_INSTRUCTION, build_prompt, expand_image_pads


@dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_depth: int = 1
    vision_heads: int = 1
    vision_intermediate_size: int = 128
    max_position_embeddings: int = 1024

    def __post_init__(self) -> None:
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size or head_dim % 8:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head_dim divisible by 8")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen2.5-VL's 16:24:24 proportion."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig) -> Qwen2_5_VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    head_dim = cfg.hidden_size // cfg.num_heads
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)},
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": cfg.vision_depth,
            "hidden_size": cfg.vision_hidden_size,
            "num_heads": cfg.vision_heads,
            "intermediate_size": cfg.vision_intermediate_size,
            "out_hidden_size": cfg.hidden_size,
            "fullatt_block_indexes": [cfg.vision_depth - 1],
            "window_size": 112,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_model(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig, *, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(tokenizer, cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()


@dataclass(frozen=True, kw_only=True)
class PromptStyle:
    """How the demo phrases a prompt (the product's vLLM path must use the same)."""

    instruction: str = DEFAULT_INSTRUCTION
    image_first: bool = True
    system: str | None = "You are a helpful assistant."


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    *,
    questions: list[str],
    images: list[Image.Image],
    encoder: ImageEncoder,
    style: PromptStyle,
    targets: list[str] | None = None,
    instructions: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded model inputs. With ``targets`` the assistant turn (target + ``<|im_end|>``) is appended
    and ``labels`` mark only its tokens (the rest -100). ``instructions`` replace the style's per row."""
    instructions = instructions or [style.instruction] * len(questions)
    prompts = [build_prompt(q, instruction=i, system=style.system, image_first=style.image_first)
               for q, i in zip(questions, instructions, strict=True)]
    return encode_prompts(tokenizer, prompts=prompts, images=images, encoder=encoder, targets=targets)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompts: list[str],
    images: list[Image.Image],
    encoder: ImageEncoder,
    targets: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``encode_batch`` for chat-formatted prompts (one image placeholder each, as ``build_prompt`` writes)."""
    pixel_values, grid_thw = encoder.encode(images)
    prompts = [expand_image_pads(p, [g]) for p, g in zip(prompts, grid_thw.tolist(), strict=True)]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if targets is None:
        seqs, labels = prompt_ids, None
    else:
        answer_ids = [tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in targets]
        seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
        labels = [[-100] * len(p) + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
        "mm_token_type_ids": (input_ids == image_id).int(),
    }
    if labels is not None:
        batch["labels"] = torch.tensor([[-100] * (width - len(l)) + l for l in labels], dtype=torch.long)
    return batch
