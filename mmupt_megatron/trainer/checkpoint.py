"""Atomic training checkpoints: ``OUTPUT/checkpoints/step_000010/`` is complete or absent.

A checkpoint is written into ``step_000010.tmp/`` and renamed once everything is in it, a ``COMPLETE``
marker last; a run killed mid-save leaves only a ``.tmp`` folder, which resume ignores (and the next save
of that step replaces). Contents:

- ``policy/``: the Megatron policy, a dist-checkpoint (loads at another TP/PP) plus its HF config/tokenizer;
- ``optimizer/rank_XXXXX.pt``: each rank's optimizer state (resume needs the same TP/PP/DP);
- ``trainer_state.json``: the step just finished, the data sampler's position, the config used;
- ``rng.pt``: the driver's Python and torch RNG states.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6})$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``trainer.resume``: auto (latest complete checkpoint, if any), never, or a checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoints_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"trainer.resume={resume!r}: not a complete checkpoint (no {COMPLETE} marker)")
    return path


def begin(root: Path, step: int) -> Path:
    """A fresh ``.tmp`` folder for the checkpoint of ``step``."""
    tmp = root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_driver_state(tmp: Path, *, step: int, sampler_state: dict[str, Any], config_yaml: str) -> None:
    state = {"step": step, "sampler": sampler_state}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, tmp / "rng.pt")


def read_driver_state(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / STATE_FILE).read_text())
    rng = torch.load(folder / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    return state


def commit(tmp: Path, *, keep_last: int) -> Path:
    """Mark ``tmp`` complete, rename it into place, and delete all but the newest ``keep_last``."""
    (tmp / COMPLETE).write_text("")
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in complete_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old)
    return final


def recorded_model_step(model_dir: str | Path) -> int | None:
    """The number of training steps a model folder's policy has taken, if the folder records it.

    Looks for the trainer's ``trainer_state.json`` (``step`` = the last finished step, counted from 0) in the
    folder or its parent (a checkpoint's ``policy/``), and, for a run's exported ``hf/`` folder, in the run's
    latest complete checkpoint (the export is written after the final save).
    """
    folder = Path(model_dir)
    for candidate in (folder, folder.parent):
        state = candidate / STATE_FILE
        if state.is_file():
            return int(json.loads(state.read_text())["step"]) + 1
    saved = complete_checkpoints(checkpoints_root(folder.parent))
    if saved and (folder / "config.json").is_file():
        return int(json.loads((saved[-1] / STATE_FILE).read_text())["step"]) + 1
    return None
