"""Where data rows come from: local parquet / JSONL / JSON files, and Hugging Face datasets.

Every ``data.train_files`` / ``data.eval_files`` entry, ``mmupt eval --data`` and ``mmupt synthesize --input``
goes through ``open_sources``, which turns it into row sources that all yield the same thing: ``(row index,
record dict)`` pairs (or an error string for a row that does not parse), images as ``{"bytes", "path"}``
dicts or paths, exactly like a parquet file. The dataset loader then checks every row the same way.

An entry is one of:
- a data file (``.parquet``, ``.jsonl``, ``.json``) or a folder of them (its files, sorted by name);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a folder of a dataset repository (data files, in subfolders too, plus a ``README.md`` card), read with
  ``datasets.load_dataset`` (splits from the card's configs or the file names);
- ``NAME`` or ``NAME@SPLIT``: a Hugging Face hub dataset id (EasyR1's spelling). With
  ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) only the local cache (``HF_DATASETS_CACHE``, by default
  ``$HF_HOME/datasets``) is read; a missing dataset is an error naming it, the split and where it looked.

``@SPLIT`` also selects a split of a saved ``DatasetDict`` or of a repository folder. Without it the split is
``train``, or the only split there is. Images may be ``datasets.Image`` features (read as stored, not
decoded here) or path strings (relative ones resolve against the dataset folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
DEFAULT_SPLIT = "train"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

Record = dict | str
"""A row as read: a dict, or a string saying why the row could not be parsed."""


@dataclass(frozen=True)
class FileSource:
    """One local parquet / JSONL / JSON file."""

    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def row_path(self) -> Path:
        return self.path

    def rows(self, *, columns: Sequence[str], required: Sequence[str]) -> Iterator[tuple[int, Record]]:
        return read_file_rows(self.path, columns=columns, required=required)


@dataclass(frozen=True)
class HFSource:
    """One split of a Hugging Face dataset (a hub id, a ``save_to_disk`` folder or a repository folder)."""

    dataset: Any = None
    label: str = ""
    """``NAME@SPLIT`` or ``FOLDER@SPLIT``, for messages."""
    base_dir: Path | None = None
    """The dataset folder (relative image paths resolve here); None for a hub id."""
    split: str = DEFAULT_SPLIT

    @property
    def stem(self) -> str:
        name = self.label.rsplit("@", 1)[0].rstrip("/")
        return f"{Path(name).name}-{self.split}"

    @property
    def row_path(self) -> Path:
        """A path whose text names the split and whose parent is ``base_dir`` (for the eval loaders' rows)."""
        return self.base_dir / self.split if self.base_dir is not None else Path(self.label)

    def rows(self, *, columns: Sequence[str], required: Sequence[str]) -> Iterator[tuple[int, Record]]:
        names = list(self.dataset.column_names)
        missing = [k for k in required if k not in names]
        if missing:
            raise ValueError(f"{self.label}: missing column(s) {missing}; columns are {names}")
        wanted = [c for c in columns if c in names] if columns else names
        # the arrow view: images stay {"bytes", "path"} structs (as in parquet), nothing is decoded here
        table = self.dataset.select_columns(wanted).with_format("arrow")
        row = 0
        for batch in table.iter(batch_size=256):
            for record in batch.to_pylist():
                yield row, record
                row += 1


RowSource = FileSource | HFSource


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


def hf_folder_kind(path: Path) -> str | None:
    """``saved`` (save_to_disk output), ``repo`` (a README.md card beside the data) or None (plain files)."""
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return "saved"
    if (path / "README.md").is_file():
        return "repo"
    return None


_SAVED_FILES = ("state.json", "dataset_info.json")
"""What ``Dataset.save_to_disk`` writes beside its ``data-*.arrow`` files."""


def saved_folder_problem(path: Path) -> str | None:
    """What a folder that ``save_to_disk`` wrote (its files or its ``.arrow`` data are there) lacks; None when it is
    complete or is no such folder. An incomplete one must not be read as a folder of data files."""
    present = [name for name in _SAVED_FILES if (path / name).is_file()]
    arrow = sorted(path.glob("*.arrow"))
    if len(present) == len(_SAVED_FILES) or not (present or arrow):
        return None
    missing = [name for name in _SAVED_FILES if name not in present]
    found = ", ".join(present + ([f"{len(arrow)} .arrow file(s)"] if arrow else []))
    return (f"{path}: a Dataset.save_to_disk folder ({found}) without its {' and '.join(missing)} (copied or saved "
            f"only in part?); it is not read as data files: restore {'/'.join(missing)} or save the dataset again")


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``NAME@SPLIT`` -> (NAME, SPLIT); an existing path is never split."""
    if "@" in spec and not Path(spec).exists():
        name, split = spec.rsplit("@", 1)
        if name and split:
            return name, split
    return spec, None


def looks_like_hub_id(spec: str) -> bool:
    """``name`` or ``org/name`` without a data-file suffix (a missing ``x.parquet`` stays a missing path)."""
    return bool(_HUB_ID.match(spec)) and not spec.endswith(DATA_SUFFIXES)


def hf_source(item: str | Path) -> HFSource | None:
    """The Hugging Face dataset an entry names, or None when it is a plain file or folder (or names nothing)."""
    name, split = _split_spec(str(item))
    path = Path(name)
    if path.is_dir() and (kind := hf_folder_kind(path)):
        return _saved_folder(path, split) if kind == "saved" else _repo_folder(path, split)
    if path.is_dir() and (problem := saved_folder_problem(path)):
        raise ValueError(problem)
    if path.exists():
        if split is not None:
            raise ValueError(f"{item}: @{split} names a split, but {path} is not a Hugging Face dataset folder "
                             "(no save_to_disk files, no README.md card)")
        return None
    if split is not None or looks_like_hub_id(name):
        return _hub_dataset(name, split)
    return None


def open_sources(source: str | Path | Sequence[str | Path]) -> list[RowSource]:
    """The row sources of one entry or a list of entries (see the module docstring); ValueError otherwise."""
    items = [source] if isinstance(source, str | Path) else list(source)
    if not items:
        raise ValueError("no data files given")
    out: list[RowSource] = []
    for item in items:
        hf = hf_source(item)
        if hf is not None:
            out.append(hf)
        else:
            out.extend(FileSource(path) for path in list_data_files(item))
    return out


# -- Hugging Face datasets ------------------------------------------------------------------------------
def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ValueError("reading Hugging Face datasets needs the 'datasets' package: pip install "
                         "'mmupt-megatron[hub]'") from e
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _pick_split(label: str, splits: Sequence[str], split: str | None) -> str:
    splits = list(splits)
    if split is not None:
        if split not in splits:
            raise ValueError(f"{label}: no split {split!r}; its splits are {splits}")
        return split
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(splits) == 1:
        return splits[0]
    raise ValueError(f"{label}: which split? it has {splits}; name one as {label}@SPLIT")


def _saved_folder(path: Path, split: str | None) -> HFSource:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for a damaged folder
        raise ValueError(f"{path}: not a readable save_to_disk folder ({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(str(path), list(loaded), split)
        return HFSource(loaded[chosen], label=f"{path}@{chosen}", base_dir=path, split=chosen)
    saved_split = str(loaded.split) if loaded.split is not None else None
    if split is not None and split != saved_split:
        raise ValueError(f"{path}: no split {split!r}; it holds one dataset"
                         + (f" (split {saved_split!r})" if saved_split else "") + f"; give {path} without @SPLIT")
    chosen = saved_split or DEFAULT_SPLIT
    return HFSource(loaded, label=str(path), base_dir=path, split=chosen)


def _prepared(builder, label: str, split: str | None) -> tuple[Any, str]:
    """(the chosen split as a Dataset, its name) of a dataset builder; ValueError naming a data file that does
    not read (``datasets`` itself names none)."""
    splits = list(builder.info.splits or {}) or list(builder.config.data_files or {})
    chosen = _pick_split(label, splits, split)
    try:
        builder.download_and_prepare()
        return builder.as_dataset(split=chosen), chosen
    except Exception as e:  # ArrowInvalid, DatasetGenerationError, ...: find the file
        bad = _unreadable_data_file(builder)
        if bad is not None:
            raise ValueError(f"{label}: data file {bad[0]}: {bad[1]}") from e
        raise ValueError(f"{label}: the dataset does not read ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _unreadable_data_file(builder) -> tuple[str, str] | None:
    """(file, why) of the first local data file of ``builder`` that does not read: a parquet file's footer
    first, then its row groups; JSON lines / JSON files parsed whole."""
    files = [str(f) for split_files in (builder.config.data_files or {}).values() for f in split_files]
    local = [Path(f) for f in dict.fromkeys(files) if Path(f).is_file()]
    parquet = [f for f in local if f.suffix == ".parquet"]
    import pyarrow.parquet as pq

    for full in (False, True):  # the footers (cheap) of every file, then the data
        for path in parquet:
            try:
                opened = pq.ParquetFile(path)
                if full:
                    for group in range(opened.num_row_groups):
                        opened.read_row_group(group)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
                return str(path), f"not a readable parquet file ({type(e).__name__}: {_first_line(e)})"
    for path in local:
        if path.suffix in (".jsonl", ".json"):
            try:
                records = list(read_file_rows(path, columns=(), required=()))
            except ValueError as e:
                return str(path), str(e)
            bad = next(((row, record) for row, record in records if isinstance(record, str)), None)
            if bad is not None:
                return str(path), f"row {bad[0]}: {bad[1]}"
    return None


def _repo_folder(path: Path, split: str | None) -> HFSource:
    datasets = _datasets()
    try:
        builder = datasets.load_dataset_builder(str(path))
    except Exception as e:  # no data files, a bad card, ...
        raise ValueError(f"{path}: not a readable dataset repository folder ({type(e).__name__}: {e})") from e
    dataset, chosen = _prepared(builder, str(path), split)
    return HFSource(dataset, label=f"{path}@{chosen}", base_dir=path, split=chosen)


def hub_cache_dirs() -> tuple[Path, Path]:
    """(datasets' Arrow cache, the hub download cache), as this process's ``datasets`` sees them."""
    datasets = _datasets()
    from huggingface_hub import constants

    return Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)


def _hub_dataset(name: str, split: str | None) -> HFSource:
    datasets = _datasets()
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    wanted = split or DEFAULT_SPLIT
    try:
        builder = datasets.load_dataset_builder(name)
    except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        arrow_cache, hub_cache = hub_cache_dirs()
        mode = "offline (HF_DATASETS_OFFLINE=1): only the local cache was read" if offline else \
            "the hub did not answer and the local cache does not have it"
        raise ValueError(
            f"Hugging Face dataset {name!r} (split {wanted!r}) not found: no local path {name!r}, and {mode}; "
            f"looked in {arrow_cache} and {hub_cache} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    dataset, chosen = _prepared(builder, name, split)
    return HFSource(dataset, label=f"{name}@{chosen}", base_dir=None, split=chosen)


# -- local files ----------------------------------------------------------------------------------------
def json_document(path: Path, raw: bytes) -> Any:
    """A whole JSON file's value; ValueError naming the file (and the line, for bytes that are not UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def decode_lines(path: Path, raw: bytes) -> Iterator[tuple[int, str | None, str | None]]:
    """(row, text, error) per line; a line that is not UTF-8 comes back as an error naming the byte."""
    for row, line in enumerate(raw.split(b"\n")):
        try:
            yield row, line.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as e:
            yield row, None, f"not UTF-8 text (byte {e.start} of the line: {line[e.start:e.start + 4]!r})"


def read_file_rows(path: Path, *, columns: Sequence[str], required: Sequence[str]) -> Iterator[tuple[int, Record]]:
    """(row index, row dict) pairs of a parquet / JSONL / JSON file; a row that does not parse comes back as an
    error string (a bad row), a file that cannot be read at all is a ValueError naming it."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, columns=columns, required=required)
        return
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip().startswith(b"["):
        records = json_document(path, raw)
        lines: list[tuple[int, Any, str | None]] = [(row, record, None) for row, record in enumerate(records)]
    else:
        lines = list(decode_lines(path, raw))
    for row, line, error in lines:
        if error is not None:
            yield row, error
            continue
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


def _parquet_rows(path: Path, *, columns: Sequence[str], required: Sequence[str]) -> Iterator[tuple[int, Record]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    names = parquet.schema_arrow.names
    missing = [k for k in required if k not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {names}")
    row = 0
    for batch in parquet.iter_batches(batch_size=256, columns=[c for c in columns if c in names] if columns else None):
        for record in batch.to_pylist():
            yield row, record
            row += 1


# -- writing a dataset folder ---------------------------------------------------------------------------
def write_dataset_folder(table, out: Path, *, image_key: str) -> Path:
    """Save an arrow table of rows as a ``save_to_disk`` folder (images as ``datasets.Image`` features), written
    beside ``out`` and renamed into place; an existing ``out`` is replaced only if it is such a folder."""
    import os
    import shutil
    import tempfile

    datasets = _datasets()
    if out.exists() and hf_folder_kind(out) != "saved":
        raise ValueError(f"{out} exists and is not a save_to_disk dataset folder; refusing to replace it")
    dataset = datasets.Dataset(table, split=datasets.Split.TRAIN)
    dataset = dataset.cast_column(image_key, datasets.List(datasets.Image()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(tmp / "dataset"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "dataset", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
