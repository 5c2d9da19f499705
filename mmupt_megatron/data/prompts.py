"""Qwen2.5-VL chat-template prompts for one image and one question, and image-pad expansion.

The prompt string (what vLLM receives, with the image in ``multi_modal_data``) keeps a single
``<|image_pad|>``; a model-side tokenisation (transformers / Megatron) needs that placeholder repeated
once per merged image token, ``prod(image_grid_thw) / merge_size**2`` times (``expand_image_pads``).

Template (Qwen2.5-VL's own, with the MM-UPT / EasyR1 instruction appended to the question)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"


def build_prompt(
    question: str,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = DEFAULT_SYSTEM,
    image_first: bool = True,
) -> str:
    """The chat-template prompt for ``question`` about one image, ending with the assistant turn's start.

    ``image_first=False`` puts the question before the image (then the image tokens can attend to the
    question; the demo's tiny models learn faster that way).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if IMAGE_PAD in question or VISION_START in question:
        raise ValueError(f"question must not contain vision tokens: {question!r}")
    text = question.strip() + instruction
    user = IMAGE_PLACEHOLDER + text if image_first else text + IMAGE_PLACEHOLDER
    system_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{system_turn}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def num_image_tokens(grid_thw: Sequence[int], *, merge_size: int = 2) -> int:
    """Merged image tokens the language model sees for one image: t * h * w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"image grid {t}x{h}x{w} is not divisible by merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def expand_image_pads(prompt: str, grids_thw: Sequence[Sequence[int]], *, merge_size: int = 2) -> str:
    """Replace the k-th ``<|image_pad|>`` of ``prompt`` by ``num_image_tokens(grids_thw[k])`` copies."""
    pieces = prompt.split(IMAGE_PAD)
    if len(pieces) - 1 != len(grids_thw):
        raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(grids_thw)} images")
    out = [pieces[0]]
    for grid, piece in zip(grids_thw, pieces[1:], strict=True):
        out.append(IMAGE_PAD * num_image_tokens(grid, merge_size=merge_size))
        out.append(piece)
    return "".join(out)
