"""Chat-template prompts and image-pad expansion against the processor's grid."""

import numpy as np
import pytest
from PIL import Image

from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.prompts import (
    DEFAULT_INSTRUCTION,
    IMAGE_PAD,
    build_prompt,
    expand_image_pads,
    num_image_tokens,
)


def test_prompt_is_qwen_chat_template():
    prompt = build_prompt("How many squares are there?")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many squares are there?"
        " Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert DEFAULT_INSTRUCTION in prompt


def test_prompt_options():
    prompt = build_prompt(" Q? ", instruction=" Box it.", system=None, image_first=False)
    assert prompt == "<|im_start|>user\nQ? Box it.<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("question", "error"), [("", "non-empty string"), ("   ", "non-empty string"),
                                               ("look <|image_pad|>", "must not contain vision tokens")])
def test_prompt_rejects_bad_questions(question, error):
    with pytest.raises(ValueError, match=error):
        build_prompt(question)


@pytest.mark.parametrize("size", [(84, 84), (200, 120), (640, 480)])
def test_expansion_matches_processor_grid(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    encoder = ImageEncoder(min_pixels=28 * 28, max_pixels=256 * 28 * 28)
    pixel_values, grid = encoder.encode([image], fast=False)
    expanded = expand_image_pads(build_prompt("Q?"), grid.tolist())
    assert expanded.count(IMAGE_PAD) == pixel_values.shape[0] // 4 == num_image_tokens(grid[0].tolist())
    assert expanded.replace(IMAGE_PAD, "") == build_prompt("Q?").replace(IMAGE_PAD, "")


def test_expansion_errors():
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_pads(build_prompt("Q?"), [])
    with pytest.raises(ValueError, match="merge_size"):
        num_image_tokens([1, 3, 4])
