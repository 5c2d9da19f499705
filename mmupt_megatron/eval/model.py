"""Which checkpoint ``mmupt eval --model`` was given, and an HF folder the engine can serve from it.

- an HF folder (``config.json`` + ``*.safetensors``) is served as it is;
- a Megatron checkpoint (``mmupt_checkpoint.json``: ``mmupt convert hf-to-megatron``) or a training
  checkpoint (``checkpoints/step_NNNNNN``, whose ``policy/`` is one) is converted to an HF folder in a
  temporary directory first (``models/convert.megatron_to_hf``, at the checkpoint's TP/PP), which is
  removed afterwards.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

META_FILE = "mmupt_checkpoint.json"  # models/convert.META_FILE (not imported: that module pulls in megatron)


@dataclass(frozen=True)
class ServedModel:
    path: Path
    """The HF folder the engine serves."""
    source: Path
    """What ``--model`` named."""
    format: str
    """``hf`` or ``megatron``."""
    convert_s: float = 0.0


def detect_model_format(path: str | Path) -> tuple[str, Path]:
    """(``hf``, folder) or (``megatron``, checkpoint folder); ValueError saying what a folder needs."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--model {folder}: not a folder")
    if (folder / META_FILE).is_file():
        return "megatron", folder
    if (folder / "policy" / META_FILE).is_file():
        return "megatron", folder / "policy"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "hf", folder
    raise ValueError(
        f"--model {folder}: neither an HF folder (config.json + *.safetensors) nor a Megatron checkpoint "
        f"({META_FILE}, or policy/{META_FILE} in a training checkpoint)"
    )


def _megatron_to_hf(ckpt: Path, out: Path) -> None:
    from mmupt_megatron.models.convert import megatron_to_hf

    megatron_to_hf(ckpt, out)


@contextmanager
def served_model(path: str | Path, *, convert: Callable[[Path, Path], None] = _megatron_to_hf) -> Iterator[ServedModel]:
    """The HF folder to serve for ``path``; a converted one lives until the context exits."""
    kind, folder = detect_model_format(path)
    if kind == "hf":
        yield ServedModel(path=folder, source=Path(path), format="hf")
        return
    with tempfile.TemporaryDirectory(prefix="mmupt-eval-") as tmp:
        out = Path(tmp) / "hf"
        start = time.perf_counter()
        convert(folder, out)
        yield ServedModel(path=out, source=Path(path), format="megatron", convert_s=time.perf_counter() - start)
