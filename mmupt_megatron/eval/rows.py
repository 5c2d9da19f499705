"""Reading benchmark files row by row, and the pieces every benchmark format shares.

A benchmark file is JSON (a list of rows, or an object of rows keyed by id, as MathVista's testmini.json),
JSONL (one row per line) or parquet (the Hugging Face copies; images as ``{"bytes", "path"}`` structs).
Every problem is a ``BadRow`` (a ValueError) naming the file, the row (its index, and its id once known) and
the field: ``{file} row 3 (pid '17'), field 'image': image file not found: ...``; ``eval.on_bad_row=skip``
counts it under its ``reason`` instead of stopping.

Multiple choice: options carry the letters the benchmark prints (A, B, C, ... at most J; We-Math sometimes
skips one: ``... D. 1; F. No correct answer``) and the reference answer is always a letter.
``choice_answer`` reads a published answer as a letter first (We-Math, MathVerse, MathVision publish letters:
an option text that is itself a letter, ``A. F; B. D``, must not capture the answer ``D``) or as an option's
text first (MathVista publishes the choice's text).

Relative image paths are looked up in ``--images DIR``, then next to the data file, then in its parent folder
(MathVision ships ``data/test.jsonl`` with ``images/`` at the repository root).

Broken LaTeX escapes: a published ``"\\frac12"`` written with one backslash reaches us through the JSON
decoder as a form feed + ``rac12`` (likewise ``\\b``, and ``\\t``/``\\n``/``\\r`` before ``imes``, ``eq``,
``ight``...). ``repair_escapes`` restores the backslash command; answers keep a record of the repair.
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
from mmupt_megatron.data.sources import decode_lines, hf_source, json_document

LETTERS = "ABCDEFGHIJ"
BENCHMARK_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True, kw_only=True)
class Question:
    """One benchmark question, ready to become a prompt."""

    id: str
    question: str
    """The question text, without its options."""
    options: tuple[str, ...] = ()
    """Option texts in printed order; empty for free-form questions (and for choices shown only in the image)."""
    letters: tuple[str, ...] = ()
    """The options' printed letters; empty means A, B, C, ... (see ``labels``)."""
    choice: bool = False
    """Multiple choice: ``answer`` is a letter (or several, ``C, D``)."""
    answer: str
    hints: tuple[str, ...] = ()
    """Format hints (unit, decimal places) shown after the question."""
    category: str = "all"
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The benchmark's own tables: {table: (values this question counts under)}, e.g. {"skill": (...)}."""
    image: bytes | Path | None = field(repr=False)
    """None: a text-only question (MathVerse's Text Only file)."""
    image_size: tuple[int, int] | None
    """(width, height) of the decoded image."""
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Benchmark fields kept for the report (unit, precision, answer type, version, level, skills, ...)."""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.letters or tuple(LETTERS[: len(self.options)])


class BadRow(ValueError):
    """A row that cannot be used as published; ``reason`` is the short form counted by ``on_bad_row=skip``."""

    def __init__(self, message: str, *, origin: str, field: str | None, reason: str):
        super().__init__(message)
        self.origin, self.field, self.reason = origin, field, reason


def _short(message: str) -> str:
    """A reason to count: the message up to its first ':' or '(', with quoted values elided."""
    head = re.split(r":\s|\s\(", message, maxsplit=1)[0]
    return re.sub(r"'[^']*'|\"[^\"]*\"", "…", head).strip()


class Row:
    """One record and where it came from; ``fail`` makes a BadRow that names the row and the field."""

    def __init__(self, path: Path, index: int, record: Any, *, key: str | None = None):
        self.path, self.index, self.record, self.key = path, index, record, key
        self.id: str | None = None

    @property
    def origin(self) -> str:
        name = f"{self.path} row {self.index}"
        if self.key is not None:
            return f"{name} (key {self.key!r})"
        return f"{name} (id {self.id!r})" if self.id is not None else name

    def fail(self, name: str | None, message: str, *, reason: str | None = None) -> BadRow:
        where = f", field {name!r}" if name else ""
        why = reason or _short(message)
        return BadRow(f"{self.origin}{where}: {message}", origin=self.origin, field=name,
                      reason=f"{name}: {why}" if name else why)

    def get(self, name: str) -> Any:
        if name not in self.record:
            raise self.fail(name, f"missing (the row has {sorted(self.record)})", reason="missing")
        return self.record[name]

    def text(self, name: str, *, allow_empty: bool = False) -> str:
        """A string field; numbers are accepted (answers are often stored as numbers)."""
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            shape = type(value).__name__ if value is not None else "null"
            raise self.fail(name, f"expected a string, got {shape}: {value!r}", reason=f"expected a string, got {shape}")
        text = str(value).strip(" \n\r\t\v")  # not \f / \b: they are what is left of broken escapes
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
    raw = path.read_bytes()
    if path.suffix == ".json":
        data = json_document(path, raw)
        if isinstance(data, list):
            yield from (Row(path, i, record) for i, record in enumerate(data))
        elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            yield from (Row(path, i, record, key=str(key)) for i, (key, record) in enumerate(data.items()))
        else:
            raise ValueError(f"{path}: expected a JSON list of rows or an object of rows keyed by id, "
                             f"got {type(data).__name__}")
        return
    for i, line, error in decode_lines(path, raw):
        if error is not None:
            raise ValueError(f"{path} line {i + 1}: {error}")
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


def image_dirs(path: Path, images: str | Path | None = None) -> tuple[Path, ...]:
    """Where relative image paths of ``path``'s rows are looked up, in order (see the module docstring)."""
    dirs = [Path(images)] if images else []
    dirs += [path.parent, path.parent.parent]
    return tuple(dict.fromkeys(dirs))


def present_image(row: Row, names: Sequence[str]) -> str | None:
    """The first of the fields ``names`` that holds an image (not null / empty), or None."""
    return next((n for n in names if row.record.get(n) not in (None, "", [], {})), None)


def image_source(row: Row, names: Sequence[str], dirs: Sequence[Path] = ()) -> tuple[str, bytes | Path]:
    """The first usable image among the fields ``names`` (bytes, a path, a ``{bytes, path}`` dict, a one-element
    list of those); a relative path is looked up in ``dirs`` (default: the data file's folder)."""
    name = present_image(row, names)
    if name is None:
        raise row.fail(names[0], f"no image (looked for {list(names)})", reason="no image")
    value = row.record[name]
    if isinstance(value, str):
        value = value.strip()
    dirs = tuple(dirs) or (row.path.parent,)
    try:
        source = dataset_image_source(value, base_dir=dirs[0])
    except ImageError as e:
        raise row.fail(name, str(e)) from e
    relative = _relative(value)
    if isinstance(source, Path) and not source.is_file() and relative is not None and len(dirs) > 1:
        found = next((d / relative for d in dirs if (d / relative).is_file()), None)
        if found is None:
            tried = ", ".join(str(d / relative) for d in dirs)
            raise row.fail(name, f"image file not found: {relative} (looked in {tried}; --images DIR names "
                                 "the folder the benchmark's image paths start from)", reason="image file not found")
        source = found
    return name, source


def _relative(value: Any) -> Path | None:
    """The relative path an image field names (a string, a ``{path}`` dict without bytes, a one-element list of
    those); None for bytes and absolute paths."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if isinstance(value, str) and value.strip() and not Path(value.strip()).is_absolute():
        return Path(value.strip())
    return None


def checked_image(row: Row, names: Sequence[str], dirs: Sequence[Path] = (), *,
                  max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[bytes | Path, tuple[int, int]]:
    """``image_source``, decoded once to check it; returns the source and the image's (width, height)."""
    name, source = image_source(row, names, dirs)
    try:
        image = load_image(source, max_decode_pixels=max_decode_pixels)
    except ImageError as e:
        raise row.fail(name, str(e)) from e
    return source, image.size


_LETTER = re.compile(r"\(?([A-J])\)?\.?")


def letter_of(text: str) -> str | None:
    """``B``, ``(B)``, ``B.`` -> ``B``; None for anything else."""
    match = _LETTER.fullmatch(text.strip())
    return match.group(1) if match else None


def choice_answer(row: Row, name: str, answer: str, options: Sequence[str], letters: Sequence[str] = (), *,
                  published: str = "letter") -> str:
    """The letter of ``answer`` among ``options`` (printed ``letters``, default A, B, ...).

    ``published="letter"``: a letter-shaped answer is a letter, whatever the option texts say; an answer that
    is not letter-shaped may still be an option's exact text. ``published="text"`` (MathVista): an option's
    text first, then a letter. With no options (choices shown in the image) the answer must be a letter."""
    if len(options) > len(LETTERS):
        raise row.fail(name, f"{len(options)} options; at most {len(LETTERS)} (letters A-J) are supported",
                       reason="more than 10 options")
    letters = tuple(letters) or tuple(LETTERS[: len(options)])
    folded = [" ".join(o.split()).casefold() for o in options]
    text = " ".join(answer.split()).casefold()
    by_text = letters[folded.index(text)] if text in folded else None
    letter = letter_of(answer)
    if letter is not None and options and letter not in letters:
        letter = None
    found = (letter or by_text) if published == "letter" else (by_text or letter)
    if found is not None:
        return found
    listed = "; ".join(f"{lt}. {o}" for lt, o in zip(letters, options, strict=True)) or "none given"
    raise row.fail(name, f"{answer!r} is neither an option's letter nor an option's text (options: {listed})",
                   reason="answer is not one of the options")


_MARKER = r"(?:^|(?<=[\s;；,，]))\(?{letter}\)?\s*[.:：．)]"


def split_options(row: Row, name: str, raw: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(letters, texts) from one string of lettered options, as We-Math prints them: ``A. 3;B. 4; C. 5``,
    also without a separator (``A. 45° B. 60° ;C. 120°``) and with a skipped letter (``D. 1; F. none``).

    Options are found in letter order: each one starts at the first marker of a later letter; a letter is
    skipped only when no marker of it follows."""
    starts: list[tuple[str, int, int]] = []  # (letter, marker start, text start)
    position, next_letter = 0, 0
    while next_letter < len(LETTERS):
        found = None
        for j in range(next_letter, len(LETTERS)):
            match = re.compile(_MARKER.format(letter=LETTERS[j])).search(raw, position)
            if match:
                found = (j, match)
                break
        if found is None:
            break
        j, match = found
        starts.append((LETTERS[j], match.start(), match.end()))
        position, next_letter = match.end(), j + 1
    if not starts or starts[0][0] != "A" or raw[: starts[0][1]].strip(" ;；"):
        raise row.fail(name, f"expected options starting with 'A.', got {raw!r}", reason="options do not start with A.")
    texts = []
    for i, (_, _, text_start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(raw)
        texts.append(raw[text_start:end].strip(" \t\n;；,，"))
    if any(not t for t in texts):
        empty = starts[[not t for t in texts].index(True)][0]
        raise row.fail(name, f"option {empty} is empty in {raw!r}", reason="empty option")
    return tuple(lt for lt, _, _ in starts), tuple(texts)


_LETTERED = re.compile(r"^\s*\(?([A-J])\)?\s*[.:：．)]\s*(.*?)\s*$", re.DOTALL)


def lettered_options(row: Row, name: str, pieces: Sequence[str]) -> tuple[str, ...]:
    """Option texts from pieces like ``A. 3`` / ``(B) 4`` / ``C: 5``; the letters must run A, B, C, ..."""
    options = []
    for i, piece in enumerate(pieces):
        match = _LETTERED.match(piece)
        if not match or match.group(1) != LETTERS[i]:
            raise row.fail(name, f"option {i + 1} is {piece.strip()!r}; expected it to start with '{LETTERS[i]}.'",
                           reason="options out of order")
        options.append(match.group(2))
    return tuple(options)


# LaTeX commands whose backslash + first letter is also a JSON escape (\b \f \n \r \t).
_ESCAPED_COMMANDS = frozenset((
    "times", "text", "textbf", "textrm", "theta", "tan", "tanh", "tfrac", "to", "top", "triangle", "tau", "tilde",
    "therefore", "right", "rightarrow", "rho", "rm", "rangle", "rceil", "rfloor", "neq", "ne", "nu", "nabla", "not",
    "ngeq", "nleq", "newline", "natural", "nmid", "beta", "boxed", "bar", "bot", "binom", "bf", "big", "bigl",
    "bigr", "because", "bmod", "frac", "forall", "flat",
))
_CONTROL = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_BROKEN = re.compile(r"([\b\f\n\r\t])([A-Za-z]+)")


def repair_escapes(text: str, *, commands: bool = True) -> tuple[str, int]:
    """(text with broken LaTeX escapes restored, how many); ``\\b``/``\\f`` + letters always (they never occur
    in text), ``\\n``/``\\r``/``\\t`` + letters only with ``commands`` and where that spells a LaTeX command
    (``\\times``, ``\\neq``: for answers; in a question a line may well start with ``to``)."""
    count = 0

    def fix(match: re.Match) -> str:
        nonlocal count
        control, letters = match.groups()
        word = _CONTROL[control] + letters
        if control in "\b\f" or (commands and word in _ESCAPED_COMMANDS):
            count += 1
            return "\\" + word
        return match.group(0)

    return _BROKEN.sub(fix, text), count


def checked_answer(row: Row, name: str, answer: str, meta: dict[str, Any], *, allow_newlines: bool = False) -> str:
    """``answer`` with broken escapes repaired (recorded in ``meta["repaired_answer"]``); a control character
    left over is a bad row rather than a silently different answer."""
    repaired, count = repair_escapes(answer)
    if count:
        meta["repaired_answer"] = {"published": answer, "read_as": repaired}
    allowed = "\n" if allow_newlines else ""
    left = sorted({c for c in repaired if ord(c) < 32 and c not in allowed})
    if left:
        raise row.fail(name, f"{answer!r} contains control characters {left} (a broken escape in the file?)",
                       reason="control characters in the answer")
    return repaired
