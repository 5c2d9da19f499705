"""Inputs shared by the model / engine tests: a real PNG through the saved image processor, prompts with
the right number of <|image_pad|> tokens, and reference logits from transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def png_image(path: Path, *, height: int = 70, width: int = 90, seed: int = 0):
    """Write a random RGB PNG with PIL and read it back (as a dataset would)."""
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path, format="PNG")
    return Image.open(path).convert("RGB")


def image_prompt_batch(hf_dir: Path, image_path: Path, *, question: str = "What is the answer?", seed: int = 0):
    """(input_ids [1, T], pixel_values, image_grid_thw) for one image + question, Qwen chat format."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor = AutoImageProcessor.from_pretrained(hf_dir)
    features = processor(images=[png_image(image_path, seed=seed)], return_tensors="pt")
    grid = features["image_grid_thw"]
    num_pads = int(grid.prod()) // 4
    text = (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * num_pads
        + f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = AutoTokenizer.from_pretrained(hf_dir)(text, return_tensors="pt")["input_ids"]
    return ids, features["pixel_values"], grid


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    if config.model_type == "qwen2_5_vl":
        model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
        mm_types = (ids == config.image_token_id).int()
        return model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                     mm_token_type_ids=mm_types).logits
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model(input_ids=ids).logits
