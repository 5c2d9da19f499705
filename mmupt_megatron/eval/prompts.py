"""Benchmark questions -> ``EvalItem``s: the prompt text, images decoded lazily, prompt-length checks.

The prompt is the training chat template (``data.instruction``, ``data.system_prompt``, ``data.image_first``)
around the question text::

    {question}
    {hints, one per line}           # MathVista: unit, integer / decimal places
    Options:                        # multiple choice only
    A. {option}
    B. {option}
    Answer with the option's letter.{data.instruction}

so the training instruction asks for the ``\\boxed{}`` and, for multiple choice, the letter goes in it.
Images are decoded and fitted to ``data.min_pixels`` / ``data.max_pixels`` only when their batch is generated
(``LazyImage``): a benchmark of thousands of full-size images never sits in memory at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.configured import image_encoder, prompt_for
from mmupt_megatron.data.images import FACTOR, ImageEncoder, ImageError, load_image, smart_resize
from mmupt_megatron.data.prompts import IMAGE_PLACEHOLDER
from mmupt_megatron.eval.rows import Question
from mmupt_megatron.eval.evaluator import EvalItem

CHOICE_INSTRUCTION = "Answer with the option's letter."


def question_text(question: Question) -> str:
    """The user text before the training instruction (see the module docstring)."""
    lines = [question.question, *question.hints]
    if question.options:
        lines.append("Options:")
        lines.extend(f"{letter}. {option}" for letter, option in zip(question.labels, question.options, strict=True))
    if question.choice:
        lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


class LazyImage(Sequence):
    """A one-image sequence whose image is decoded (and fitted) when read."""

    def __init__(self, source: bytes | Path, *, encoder: ImageEncoder, max_decode_pixels: int, origin: str):
        self.source, self.encoder, self.max_decode_pixels, self.origin = source, encoder, max_decode_pixels, origin

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: Any) -> Any:
        if index not in (0, -1):
            raise IndexError(index)
        try:
            image = load_image(self.source, max_decode_pixels=self.max_decode_pixels)
        except ImageError as e:  # the file changed after it was checked
            raise ValueError(f"{self.origin}: {e}") from e
        return self.encoder.fit(image)


def eval_item(question: Question, data: DataConfig, encoder: ImageEncoder) -> EvalItem:
    """A question with an image gets the training prompt around it; a text-only one (MathVerse Text Only) the
    same prompt without the image placeholder."""
    prompt = prompt_for(question_text(question), data)
    if question.image is None:
        return EvalItem(id=question.id, category=question.category, answer=question.answer,
                        prompt=prompt.replace(IMAGE_PLACEHOLDER, "", 1), images=[])
    images = LazyImage(question.image, encoder=encoder, max_decode_pixels=data.max_decode_pixels, origin=question.origin)
    return EvalItem(id=question.id, category=question.category, answer=question.answer, prompt=prompt, images=images)


def benchmark_items(questions: Sequence[Question], data: DataConfig) -> list[EvalItem]:
    encoder = image_encoder(data)
    return [eval_item(q, data, encoder) for q in questions]


def fitted_image_tokens(size: tuple[int, int] | None, data: DataConfig, engine_pixels: tuple[int, int] | None = None) -> int:
    """Merged image tokens of a (width, height) image after the smart resize to ``data.min/max_pixels``:
    (h / 28) * (w / 28); ``engine_pixels`` (the model's own processor min/max pixels) resize the fitted image
    once more, as the engine does. 0 for no image."""
    if size is None:
        return 0
    height, width = smart_resize(size[1], size[0], min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    if engine_pixels is not None:
        height, width = smart_resize(height, width, min_pixels=engine_pixels[0], max_pixels=engine_pixels[1])
    return (height // FACTOR) * (width // FACTOR)


def prompt_lengths(questions: Sequence[Question], items: Sequence[EvalItem], data: DataConfig, tokenizer,
                   engine_pixels: tuple[int, int] | None = None) -> list[int]:
    """Prompt tokens per item as the engine counts them: text (one image pad) + image tokens - 1."""
    ids = tokenizer([item.prompt for item in items], add_special_tokens=False)["input_ids"]
    return [len(i) - (q.image is not None) + fitted_image_tokens(q.image_size, data, engine_pixels)
            for q, i in zip(questions, ids, strict=True)]


def check_prompt_lengths(questions: Sequence[Question], lengths: Sequence[int], *, max_prompt_length: int) -> None:
    """ValueError naming the longest prompt when any exceeds ``rollout.max_prompt_length``."""
    over = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    if over:
        worst = max(over, key=lambda i: lengths[i])
        raise ValueError(
            f"{len(over)} of {len(lengths)} prompts are longer than rollout.max_prompt_length={max_prompt_length} tokens "
            f"(image tokens included); the longest is {questions[worst].origin} with {lengths[worst]} tokens: pass "
            f"rollout.max_prompt_length={lengths[worst]} (or lower data.max_pixels)"
        )
