"""Reading checkpoint files without running code from them.

A pickle can call any importable function while it loads (``os.system`` included), so files a user hands us
are never unpickled freely: ``torch.load(..., weights_only=True)`` for our own ``.pt`` files (plain tensors,
numbers, strings, lists, dicts), and a restricted unpickler that only builds torch's checkpoint-index classes
for a dist-checkpoint's ``.metadata`` (torch.distributed.checkpoint reads that file with plain ``pickle``), run
before torch or megatron-core read the folder.

    state = load_plain(folder / "rng.pt")        # ValueError naming the file if it holds anything else
    check_dist_checkpoint(folder / "megatron")   # ValueError if its index would run code or is damaged
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                  "torch.distributed.checkpoint.planner")
"""Modules whose classes a dist-checkpoint index (``.metadata``) is made of."""
_INDEX_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "slice"), ("builtins", "set"),
                  ("builtins", "frozenset"), ("torch", "device"), ("torch.serialization", "_get_layout"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_LAYOUTS = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.layout)}
_MEMORY_FORMATS = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.memory_format)}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module in _INDEX_MODULES and isinstance(getattr(sys.modules.get(module), name, None), type))  # the
            # index's dataclasses and enums (building one runs no user code), not functions
            or (module, name) in _INDEX_GLOBALS
            or (module == "torch" and name in _DTYPES | _LAYOUTS | _MEMORY_FORMATS)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def load_plain(path: str | Path) -> Any:
    """``torch.load`` of a file holding only tensors and plain Python values; ValueError naming the file if it
    holds anything else (a pickle that would call code is refused before it runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: refused to load: it holds more than tensors and plain values ({first})") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None


def check_dist_checkpoint(folder: str | Path) -> None:
    """ValueError unless ``folder``'s dist-checkpoint index loads with torch's index classes alone, its data
    files are all there, whole, and every pickled object in them (the loader unpickles those freely, e.g.
    megatron-core's ``_extra_state``) loads with ``weights_only=True``."""
    import torch.distributed.checkpoint.filesystem  # the index's classes, for find_class
    import torch.distributed.checkpoint.planner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as file:
            index = _IndexUnpickler(file).load()
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a complete dist-checkpoint: {path.name} is missing") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: refused to load this checkpoint index ({error})") from None
    entries = getattr(index, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: not a dist-checkpoint index")
    pickled = {key for key, entry in entries.items() if isinstance(entry, BytesStorageMetadata)}
    needed: dict[str, int] = {}  # data file -> the bytes the index says it holds
    objects = []  # (file, offset, length) of each pickled object (megatron-core's ShardedObjects)
    for where, info in (getattr(index, "storage_data", None) or {}).items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str):
            raise ValueError(f"{path}: not a dist-checkpoint index")
        if Path(name).is_absolute() or ".." in Path(name).parts or "/" in name:
            raise ValueError(f"{path}: names a data file outside the checkpoint ({name})")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{path}: transformed (e.g. compressed) items are not read here ({name})")
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
        if getattr(where, "fqn", None) in pickled:
            objects.append((name, int(info.offset), int(info.length), where.fqn))
    for name, size in sorted(needed.items()):
        data = Path(folder) / name
        if not data.is_file():
            raise ValueError(f"{folder} is damaged: its data file {name} is missing")
        if data.stat().st_size < size:
            raise ValueError(f"{folder} is damaged: {name} holds {data.stat().st_size} bytes, the index expects {size}")
    for name, offset, length, key in objects:  # the loader unpickles these freely: they must be plain data
        with open(Path(folder) / name, "rb") as file:
            file.seek(offset)
            raw = file.read(length)
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - anything but plain data is refused
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{folder}: refused to load the pickled object {key!r} in {name} ({first})") from None
