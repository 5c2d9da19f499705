"""The data layer as the ``data.*`` config section describes it: datasets, prompts, held-out items."""

from __future__ import annotations

from collections.abc import Sequence

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.dataset import DatasetConfig, ImageQuestionDataset
from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.prompts import build_prompt


def open_dataset(files: Sequence[str], data: DataConfig) -> ImageQuestionDataset:
    return ImageQuestionDataset(
        list(files),
        cfg=DatasetConfig(problem_key=data.problem_key, image_key=data.image_key, answer_key=data.answer_key,
                          id_key=data.id_key, on_bad_row=data.on_bad_row, max_decode_pixels=data.max_decode_pixels),
    )


def prompt_for(question: str, data: DataConfig) -> str:
    return build_prompt(question, instruction=data.instruction, system=data.system_prompt, image_first=data.image_first)


def image_encoder(data: DataConfig) -> ImageEncoder:
    return ImageEncoder(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
