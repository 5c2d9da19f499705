"""A tiny Qwen2.5-VL that writes questions in ``<question>...</question>`` tags and answers in ``\\boxed{}``:
a few supervised steps on both kinds of prompt, so that end-to-end synthesis has something to keep and
something to reject (a random model never closes a tag). Its tokenizer is trained on the prompt templates,
so prompts stay short."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mmupt_megatron.algorithms.synthesis import DIRECT_TEMPLATE, IN_CONTEXT_TEMPLATE, synthesis_prompt
from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.configured import prompt_for
from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.prompts import build_prompt
from mmupt_megatron.data.synthetic import generate
from tests.tiny_models import DEFAULT_CORPUS, make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_step

NEW_QUESTIONS = (
    "How many red circles are there?",
    "How many blue squares are there?",
    "How many green shapes are there?",
    "How many triangles are there?",
    "Are there more red shapes than blue shapes?",
)
UNCLOSED = "<question>How many red"


def _targets(rng: random.Random) -> str:
    """A synthesis answer: mostly a closed question, sometimes one that never closes."""
    if rng.random() < 0.15:
        return UNCLOSED
    return f"<question>{rng.choice(NEW_QUESTIONS)}</question>"


def make_question_model(out_dir: Path, *, data: DataConfig, steps: int = 250, lr: float = 1e-3, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    corpus = [DEFAULT_CORPUS, IN_CONTEXT_TEMPLATE, DIRECT_TEMPLATE, *(f"<question>{q}</question>" for q in NEW_QUESTIONS)]
    model_dir = make_tiny_qwen2_5_vl(out_dir, seed=seed, corpus=corpus)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    encoder = ImageEncoder(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    examples = generate(8, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        example = rng.choice(examples)
        kind = step % 3
        if kind == 2:  # answer a question
            text = prompt_for(rng.choice([example.question, *NEW_QUESTIONS]), data)
            target = f"so \\boxed{{{rng.choice([1, 2, 2, 3])}}}"
        else:
            mode = "in-context" if kind == 0 else "direct"
            text = build_prompt(synthesis_prompt(mode, seed_question=example.question, seed_answer=rng.choice([None, "2"])),
                                instruction="", system=data.system_prompt, image_first=data.image_first)
            target = _targets(rng)
        pixels, grid = encoder.encode([example.image])
        teach_step(model, optimizer, tokenizer, text, target, pixels, grid)
    model.save_pretrained(model_dir)
    return model_dir
