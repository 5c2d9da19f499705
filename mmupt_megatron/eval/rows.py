"""Reading benchmark files row by row, and the pieces every benchmark format shares.

A benchmark file is JSON (a list of rows, or an object of rows keyed by id, as MathVista's testmini.json),
JSONL (one row per line) or parquet (the Hugging Face copies; images as ``{"bytes", "path"}`` structs).
Every problem is a ``ValueError`` naming the file, the row (its index, and its id once known) and the
field: ``{file} row 3 (pid '17'), field 'image': image file not found: ...``.

Multiple choice: options are lettered A, B, C, ... (at most ten: the answer matcher knows letters A-J) and
the reference answer is always the letter, also when a file gives the option's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmupt_megatron.data.dataset import image_source as dataset_image_source
from mmupt_megatron.data.images import DEFAULT_MAX_DECODE_PIXELS, ImageError, load_image
from mmupt_megatron.data.sources import hf_source

LETTERS = "ABCDEFGHIJ"
BENCHMARK_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True, kw_only=True)
class Question:
    """One benchmark question, ready to become a prompt."""

    id: str
    question: str
    """The question text, without its options."""
    options: tuple[str, ...] = ()
    """Option texts in letter order; empty for free-form questions (and for choices shown only in the image)."""
    choice: bool = False
    """Multiple choice: ``answer`` is a letter."""
    answer: str
    hints: tuple[str, ...] = ()
    """Format hints (unit, decimal places) shown after the question."""
    category: str = "all"
    image: bytes | Path = field(repr=False)
    image_size: tuple[int, int]
    """(width, height) of the decoded image."""
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Benchmark fields kept for the report (source, level, skills, ...)."""


class Row:
    """One record and where it came from; ``fail`` raises a ValueError that names the row and the field."""

    def __init__(self, path: Path, index: int, record: Any, *, key: str | None = None):
        self.path, self.index, self.record, self.key = path, index, record, key
        self.id: str | None = None

    @property
    def origin(self) -> str:
        name = f"{self.path} row {self.index}"
        if self.key is not None:
            return f"{name} (key {self.key!r})"
        return f"{name} (id {self.id!r})" if self.id is not None else name

    def fail(self, name: str | None, message: str) -> ValueError:
        where = f", field {name!r}" if name else ""
        return ValueError(f"{self.origin}{where}: {message}")

    def get(self, name: str) -> Any:
        if name not in self.record:
            raise self.fail(name, f"missing (the row has {sorted(self.record)})")
        return self.record[name]

    def text(self, name: str, *, allow_empty: bool = False) -> str:
        """A string field; numbers are accepted (answers are often stored as numbers)."""
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            shape = type(value).__name__ if value is not None else "null"
            raise self.fail(name, f"expected a string, got {shape}: {value!r}")
        text = str(value).strip()
        if not text and not allow_empty:
            raise self.fail(name, "empty")
        return text


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of a benchmark file in order (lazily for JSONL and parquet); ValueError for an unreadable file.
    A Hugging Face dataset (``NAME[@SPLIT]`` or a dataset folder; see ``mmupt_megatron.data.sources``) is read
    through the data layer's sources."""
    hf = None if path.is_file() else hf_source(path)
    if hf is not None:
        yield from (Row(hf.row_path, i, record) for i, record in hf.rows(columns=(), required=()))
        return
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the benchmark's .json / .jsonl / .parquet file "
                         "(only --benchmark generic reads folders)")
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    if path.suffix not in BENCHMARK_SUFFIXES:
        raise ValueError(f"{path}: unknown benchmark file format {path.suffix!r}; expected one of {BENCHMARK_SUFFIXES}")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        if isinstance(data, list):
            yield from (Row(path, i, record) for i, record in enumerate(data))
        elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            yield from (Row(path, i, record, key=str(key)) for i, (key, record) in enumerate(data.items()))
        else:
            raise ValueError(f"{path}: expected a JSON list of rows or an object of rows keyed by id, "
                             f"got {type(data).__name__}")
        return
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                yield Row(path, i, json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i + 1}: invalid JSON ({e})") from e


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    index = 0
    for batch in parquet.iter_batches(batch_size=64):
        for record in batch.to_pylist():
            yield Row(path, index, record)
            index += 1


def image_source(row: Row, names: Sequence[str]) -> tuple[str, bytes | Path]:
    """The first usable image among the fields ``names`` (bytes, a path, a ``{bytes, path}`` dict, a one-element
    list of those); relative paths resolve against the data file's folder."""
    present = [n for n in names if row.record.get(n) not in (None, "", [], {})]
    if not present:
        raise row.fail(names[0], f"no image (looked for {list(names)})")
    name = present[0]
    value = row.record[name]
    if isinstance(value, str):
        value = value.strip()
    try:
        return name, dataset_image_source(value, base_dir=row.path.parent)
    except ImageError as e:
        raise row.fail(name, str(e)) from e


def checked_image(row: Row, names: Sequence[str], *, max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[bytes | Path, tuple[int, int]]:
    """``image_source``, decoded once to check it; returns the source and the image's (width, height)."""
    name, source = image_source(row, names)
    try:
        image = load_image(source, max_decode_pixels=max_decode_pixels)
    except ImageError as e:
        raise row.fail(name, str(e)) from e
    return source, image.size


def choice_answer(row: Row, name: str, answer: str, options: Sequence[str]) -> str:
    """The letter of ``answer`` among ``options``: the answer may be a letter (``B``, ``(B)``, ``B.``) or an
    option's exact text (whitespace and case aside)."""
    if len(options) > len(LETTERS):
        raise row.fail(name, f"{len(options)} options; at most {len(LETTERS)} (letters A-J) are supported")
    folded = [" ".join(o.split()).casefold() for o in options]
    text = " ".join(answer.split()).casefold()
    if text in folded:
        return LETTERS[folded.index(text)]
    letter = re.fullmatch(r"\(?([A-J])\)?\.?", answer.strip())
    if letter and (not options or LETTERS.index(letter.group(1)) < len(options)):
        return letter.group(1)
    listed = "; ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) or "none given"
    raise row.fail(name, f"{answer!r} is neither an option's letter nor an option's text (options: {listed})")


_LETTERED = re.compile(r"^\s*\(?([A-J])\)?\s*[.:：．)]\s*(.*?)\s*$", re.DOTALL)


def lettered_options(row: Row, name: str, pieces: Sequence[str]) -> tuple[str, ...]:
    """Option texts from pieces like ``A. 3`` / ``(B) 4`` / ``C: 5``; the letters must run A, B, C, ..."""
    options = []
    for i, piece in enumerate(pieces):
        match = _LETTERED.match(piece)
        if not match or match.group(1) != LETTERS[i]:
            raise row.fail(name, f"option {i + 1} is {piece.strip()!r}; expected it to start with '{LETTERS[i]}.'")
        options.append(match.group(2))
    return tuple(options)
