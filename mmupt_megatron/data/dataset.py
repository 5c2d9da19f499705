"""Image + question datasets in the EasyR1 / MM-UPT row format, from parquet or JSONL.

A source is a file, a list of files, or a folder (its ``*.parquet``, ``*.jsonl`` and ``*.json`` files,
sorted by name). Each row has (key names configurable):
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
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmupt_megatron.data.images import DEFAULT_MAX_DECODE_PIXELS, ImageError, load_image

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
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
    """A row that cannot be used; the message names the file and row."""


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


def list_data_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The data files of a file, a list of files, or a folder; ValueError for anything else."""
    items = [source] if isinstance(source, str | Path) else list(source)
    if not items:
        raise ValueError("no data files given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise ValueError(f"data folder {path} has no {'/'.join(DATA_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"unknown data format {path.suffix!r} of {path}; expected one of {DATA_SUFFIXES}")
            files.append(path)
        else:
            raise ValueError(f"data path not found: {path}")
    return files


def _read_rows(path: Path, *, columns: Sequence[str], required: Sequence[str]) -> Iterator[tuple[int, dict | str]]:
    """(row index, row dict) pairs; a row that does not parse comes back as an error string."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
        names = parquet.schema_arrow.names
        missing = [k for k in required if k not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns are {names}")
        row = 0
        for batch in parquet.iter_batches(batch_size=256, columns=[c for c in columns if c in names]):
            for record in batch.to_pylist():
                yield row, record
                row += 1
        return
    with path.open(encoding="utf-8") as handle:
        text = handle.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        lines: list[Any] = records
    else:
        lines = text.splitlines()
    for row, line in enumerate(lines):
        if isinstance(line, str):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield row, f"invalid JSON: {e}"
                continue
        else:
            record = line
        if not isinstance(record, dict):
            yield row, f"expected a JSON object, got {type(record).__name__}"
            continue
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path} row {row}: missing key(s) {missing}; keys are {sorted(record)}")
        yield row, record


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


class ImageQuestionDataset:
    """Validated samples; ``dataset[i]`` returns (Sample, RGB image decoded on demand)."""

    def __init__(self, source: str | Path | Sequence[str | Path], *, cfg: DatasetConfig | None = None):
        self.cfg = cfg or DatasetConfig()
        self.files = list_data_files(source)
        self.skipped = SkipReport()
        self.samples: list[Sample] = []
        columns = [self.cfg.problem_key, self.cfg.image_key, self.cfg.answer_key, self.cfg.id_key]
        for path in self.files:
            for row, record in _read_rows(path, columns=columns, required=[self.cfg.problem_key, self.cfg.image_key]):
                try:
                    self.samples.append(self._check(path, row, record))
                except BadRowError as e:
                    if self.cfg.on_bad_row == "error":
                        raise
                    self.skipped.add(e.args[1], e.args[0])
        if not self.samples:
            detail = f" ({self.skipped.summary()})" if self.skipped.total else ""
            raise ValueError(f"no usable rows in {', '.join(str(f) for f in self.files)}{detail}")

    def _check(self, path: Path, row: int, record: dict | str) -> Sample:
        origin = f"{path} row {row}"
        if isinstance(record, str):
            raise BadRowError(f"{origin}: {record}", "unparseable row")
        question = record.get(self.cfg.problem_key)
        if not isinstance(question, str) or not question.strip():
            raise BadRowError(f"{origin}: empty or missing question ({self.cfg.problem_key!r} = {question!r})", "empty question")
        try:
            source = image_source(record.get(self.cfg.image_key), base_dir=path.parent)
            load_image(source, max_decode_pixels=self.cfg.max_decode_pixels)
        except ImageError as e:
            reason = "image over pixel cap" if "hard cap" in str(e) else "missing image" if "not found" in str(e) else "bad image"
            raise BadRowError(f"{origin}: {e}", reason) from e
        answer = record.get(self.cfg.answer_key)
        sample_id = record.get(self.cfg.id_key)
        return Sample(
            id=str(sample_id) if sample_id not in (None, "") else f"{path.stem}:{row}",
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
