"""A tiny Qwen2.5-VL that answers in ``\\boxed{}``: a few supervised steps on random targets, so that
votes, rewards and advantages are non-trivial in end-to-end tests (a random model never boxes)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.configured import prompt_for
from mmupt_megatron.data.prompts import expand_image_pads
from mmupt_megatron.data.synthetic import generate


def teach_step(model, optimizer, tokenizer, prompt: str, target: str, pixels: torch.Tensor, grid: torch.Tensor) -> float:
    """One supervised step on ``prompt`` (its image pads expanded to ``grid``) -> ``target`` + <|im_end|>."""
    prompt_ids = tokenizer(expand_image_pads(prompt, grid.tolist()))["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(target + "<|im_end|>")["input_ids"]])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=labels,
                mm_token_type_ids=(ids == image_id).int())
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return out.loss.item()


def teach_boxed_answers(model_dir: Path, *, steps: int = 30, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    encoder = ImageEncoder(min_pixels=56 * 56, max_pixels=112 * 112)
    examples = generate(8, seed=seed)
    style = load_config("demo").data  # the prompt format the end-to-end tests train with
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        example = rng.choice(examples)
        pixels, grid = encoder.encode([example.image])
        prompt = prompt_for(example.question, style)
        teach_step(model, optimizer, tokenizer, prompt, f"so \\boxed{{{rng.choice([1, 2, 2, 3])}}}", pixels, grid)
    model.save_pretrained(model_dir)
    return model_dir
