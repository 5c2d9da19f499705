"""Data: image + question datasets (parquet / JSONL / Hugging Face datasets), image processing for Qwen2.5-VL,
chat prompts, a resumable sampler, and the demo's synthetic visual-counting world."""

from mmupt_megatron.data.dataset import (
    DatasetConfig,
    ImageQuestionDataset,
    Sample,
    SkipReport,
    list_data_files,
)
from mmupt_megatron.data.images import ImageEncoder, ImageError, fit_image, load_image, patchify, smart_resize
from mmupt_megatron.data.prompts import DEFAULT_INSTRUCTION, build_prompt, expand_image_pads, num_image_tokens
from mmupt_megatron.data.sampler import ResumableSampler
from mmupt_megatron.data.sources import open_sources

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DatasetConfig",
    "ImageEncoder",
    "ImageError",
    "ImageQuestionDataset",
    "ResumableSampler",
    "Sample",
    "SkipReport",
    "build_prompt",
    "expand_image_pads",
    "fit_image",
    "list_data_files",
    "load_image",
    "num_image_tokens",
    "open_sources",
    "patchify",
    "smart_resize",
]
