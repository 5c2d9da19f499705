"""Image + question datasets in the EasyR1 / MM-UPT row format, from parquet, JSONL or Hugging Face datasets.

A source is a file, a folder (its ``*.parquet``, ``*.jsonl`` and ``*.json`` files, sorted by name), a Hugging
Face dataset (``NAME[@SPLIT]``, a ``save_to_disk`` folder, a dataset repository folder: see
``mmupt_megatron.data.sources``), or a list of those; all of them are checked by the same code here.
Each row has (key names configurable):
- ``problem``: the question text (non-empty);
- ``images``: one image, as a ``{"bytes": ..., "path": ...}`` dict (parquet), a path string, raw bytes, or
  a one-element list of those. JSONL may give ``bytes`` base64-encoded. Relative paths resolve against
  the data file's folder;
- ``answer`` (optional): the held-out answer, for evaluation and diagnostics only — never for rewards;
- ``id`` (optional): defaults to ``{file stem}:{row}``.

Every row is checked when the dataset is built (the image is decoded once, under the hard pixel cap).
A bad row raises a ValueError naming the file and row, or with ``on_bad_row="skip"`` is counted in
``dataset.skipped`` (a ``SkipReport``: counts per reason plus the first examples) — never silently lost.
A missing column or an unknown file format is always an error.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmupt_megatron.data.images import (
    DEFAULT_MAX_DECODE_PIXELS,
    ImageError,
    ImageMissing,
    ImageShapeError,
    ImageTooLarge,
    check_aspect_ratio,
    load_image,
)
from mmupt_megatron.data.sources import DATA_SUFFIXES, RowSource, list_data_files, open_sources

__all__ = ["DATA_SUFFIXES", "BadRowError", "DatasetConfig", "ImageQuestionDataset", "Sample", "SkipReport",
           "image_source", "list_data_files"]

BAD_ROW_POLICIES = ("error", "skip")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    problem_key: str = "problem"
    image_key: str = "images"
    answer_key: str = "answer"
    id_key: str = "id"
    on_bad_row: str = "error"
    """``error``: raise on the first bad row; ``skip``: drop it and count it in ``SkipReport``."""
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
    """Hard cap on a decoded image's pixels (decompression-bomb guard; not the resize limit)."""

    def __post_init__(self) -> None:
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}")
        if self.max_decode_pixels <= 0:
            raise ValueError(f"data.max_decode_pixels must be > 0, got {self.max_decode_pixels}")


class BadRowError(ValueError):
    """A row that cannot be used; the message names the file and row, ``reason`` is the short form counted by
    ``on_bad_row=skip``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)  # one argument: str(error) is the message, not a tuple
        self.reason = reason

    def __reduce__(self):  # pickles (Ray) with both arguments
        return type(self), (str(self), self.reason)


@dataclass
class SkipReport:
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} rows ({reasons}); first: {self.examples[0]}"


@dataclass(frozen=True)
class Sample:
    id: str
    question: str
    image_source: Any = field(repr=False)
    """What ``load_image`` decodes (bytes or a resolved path)."""
    answer: str | None
    origin: str
    """``file:row`` for error messages."""


def image_source(value: Any, *, base_dir: Path) -> bytes | Path:
    """Normalise an image field (bytes, a path, a ``{bytes, path}`` dict, a one-element list of those) to bytes
    or a path resolved against ``base_dir`` (raises ImageError)."""
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise ImageError(f"expected exactly one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        raw, path = value.get("bytes"), value.get("path")
        if raw:
            if isinstance(raw, str):
                try:
                    return base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise ImageError(f"image 'bytes' is a string that is not base64: {e}") from e
            return bytes(raw)
        if path:
            value = path
        else:
            raise ImageError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str | Path) and str(value):
        path = Path(value)
        return path if path.is_absolute() else base_dir / path
    raise ImageError(f"no usable image (got {type(value).__name__})")


_IMAGE_REASONS = {ImageTooLarge: "image over pixel cap", ImageMissing: "missing image",
                  ImageShapeError: "extreme aspect ratio"}


class ImageQuestionDataset:
    """Validated samples; ``dataset[i]`` returns (Sample, RGB image decoded on demand)."""

    def __init__(self, source: str | Path | Sequence[str | Path], *, cfg: DatasetConfig | None = None):
        self.cfg = cfg or DatasetConfig()
        self.sources: list[RowSource] = open_sources(source)
        self.files = [s.label for s in self.sources]
        """What was read, for messages: file paths, ``NAME@SPLIT`` / ``FOLDER@SPLIT`` of Hugging Face datasets."""
        self.skipped = SkipReport()
        self.samples: list[Sample] = []
        columns = [self.cfg.problem_key, self.cfg.image_key, self.cfg.answer_key, self.cfg.id_key]
        for src in self.sources:
            for row, record in src.rows(columns=columns, required=[self.cfg.problem_key, self.cfg.image_key]):
                try:
                    self.samples.append(self._check(src, row, record))
                except BadRowError as e:
                    if self.cfg.on_bad_row == "error":
                        raise
                    self.skipped.add(e.reason, str(e))
        if not self.samples:
            detail = f" ({self.skipped.summary()})" if self.skipped.total else ""
            raise ValueError(f"no usable rows in {', '.join(self.files)}{detail}")

    def _check(self, src: RowSource, row: int, record: dict | str) -> Sample:
        origin = f"{src.label} row {row}"
        if isinstance(record, str):
            raise BadRowError(f"{origin}: {record}", "unparseable row")
        key = self.cfg.problem_key
        question = record.get(key)
        if question is not None and not isinstance(question, str):
            shown = f"{len(question)} bytes" if isinstance(question, bytes | bytearray) else type(question).__name__
            raise BadRowError(f"{origin}: the question ({key!r}) is {shown}, not text: {question!r:.80}", "question not text")
        if not question or not question.strip():
            raise BadRowError(f"{origin}: empty or missing question ({key!r} = {question!r})", "empty question")
        try:
            source = image_source(record.get(self.cfg.image_key), base_dir=src.base_dir or Path.cwd())
            image = load_image(source, max_decode_pixels=self.cfg.max_decode_pixels)
            check_aspect_ratio(*image.size)  # what the resize at training time would refuse
        except ImageError as e:
            raise BadRowError(f"{origin}: {e}", _IMAGE_REASONS.get(type(e), "bad image")) from e
        answer = record.get(self.cfg.answer_key)
        sample_id = record.get(self.cfg.id_key)
        return Sample(
            id=str(sample_id) if sample_id not in (None, "") else f"{src.stem}:{row}",
            question=question.strip(),
            image_source=source,
            answer=None if answer is None else str(answer),
            origin=origin,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Sample, Image.Image]:
        sample = self.samples[index]
        try:
            image = load_image(sample.image_source, max_decode_pixels=self.cfg.max_decode_pixels)
        except ImageError as e:  # the file changed after validation
            raise ValueError(f"{sample.origin}: {e}") from e
        return sample, image
