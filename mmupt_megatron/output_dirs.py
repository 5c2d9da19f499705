"""Output folders we may write, replace or delete: only what mmupt itself wrote, never an input.

    check_apart(out, {"--hf": hf_dir}, out_label="--out")   # out is not, inside, or around an input
    prepare_owned_dir(out, kind="hf-to-megatron", force=True, out_label="--out")

A folder mmupt writes gets an ownership marker (``.mmupt-output``, JSON: what wrote it) as its first file;
``--force`` / a re-run replaces a folder only when it carries that marker. Plain files, no framework imports.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

OWNER_FILE = ".mmupt-output"


def check_apart(out: str | Path, inputs: dict[str, str | Path], *, out_label: str) -> None:
    """ValueError if ``out`` is one of ``inputs``, sits inside one, or contains one (any of those would
    write into, or on --force delete, what the user gave us to read)."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        source = Path(path).resolve()
        if target == source:
            raise ValueError(f"{out_label} {out} is the input {label} {path} itself: choose another {out_label}")
        if source in target.parents:
            raise ValueError(f"{out_label} {out} lies inside the input {label} {path}: choose a folder outside it")
        if target in source.parents:
            raise ValueError(f"{out_label} {out} contains the input {label} {path}: choose a folder that does not")


def mark_owned(folder: str | Path, *, kind: str) -> None:
    """Record that mmupt (``kind``: what wrote it) owns ``folder``."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps({"written_by": f"mmupt {kind}", "created": time.time()}) + "\n")


def is_owned(folder: str | Path) -> bool:
    return (Path(folder) / OWNER_FILE).is_file()


def remove_owned(folder: str | Path, *, out_label: str) -> None:
    """Delete ``folder`` if mmupt wrote it (it has the marker); ValueError otherwise."""
    path = Path(folder)
    if not path.is_dir() or path.is_symlink() or not is_owned(path):
        raise ValueError(
            f"{out_label} {folder} is not empty and was not written by mmupt (no {OWNER_FILE} marker): it is "
            f"never deleted, not even with --force; remove it yourself or choose another {out_label}"
        )
    shutil.rmtree(path)


def prepare_owned_dir(out: str | Path, *, kind: str, force: bool, out_label: str) -> Path:
    """An empty ``out`` marked as ours. A non-empty ``out`` is an error, unless ``force`` and mmupt wrote it
    (then it is replaced)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{out_label} {out} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ValueError(f"{out_label} {out} is not empty; pass --force to replace a previous mmupt output")
        remove_owned(path, out_label=out_label)
    try:
        path.mkdir(parents=True, exist_ok=True)
        mark_owned(path, kind=kind)
    except OSError as error:
        raise ValueError(f"{out_label} {out} cannot be written: {error.strerror or error}") from None
    return path
