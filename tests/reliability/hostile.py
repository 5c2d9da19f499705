"""Builders of hostile and damaged files for the reliability tests: pickles that would run code, and a
small but genuine checkpoint folder (real dist-checkpoint indexes written by torch) to damage."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import torch


class RunsCode:
    """Unpickling this runs ``touch MARKER`` (what an attacker's checkpoint would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(path: Path, marker: Path, *, wrap=lambda payload: payload, raw: bool = False) -> Path:
    """A file that runs code when loaded: torch.save format, or a bare pickle (``raw``: what a dist-checkpoint
    index is)."""
    if raw:
        with open(path, "wb") as file:
            pickle.dump(wrap(RunsCode(marker)), file)
    else:
        torch.save(wrap(RunsCode(marker)), path)
    return path


def dist_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A torch dist-checkpoint (single process) plus megatron-core's metadata.json, as a save leaves it."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, checkpoint_id=str(folder), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return folder


def training_checkpoint(root: Path, step: int) -> Path:
    """``root/step_NNNNNN`` with every file a complete checkpoint has (small tensors in its indexes)."""
    from mmupt_megatron.models.convert import META_FILE
    from mmupt_megatron.trainer import checkpoint as ckpt

    folder = ckpt.step_dir(root, step)
    dist_checkpoint(folder / "policy" / "megatron", {"weight": torch.full((4, 4), float(step))})
    (folder / "policy" / "hf").mkdir()
    (folder / "policy" / META_FILE).write_text(json.dumps({"tp": 1, "pp": 1, "dtype": "float32"}))
    dist_checkpoint(folder / "optimizer", {"exp_avg": torch.zeros(4)})
    random.seed(step)
    ckpt.write_driver_state(folder, step=step, sampler_state={"epoch": 0, "position": step}, config_yaml="{}\n")
    (folder / ckpt.COMPLETE).write_text("")
    return folder


def metadata_with(folder: Path, edit) -> None:
    """Rewrite ``folder/.metadata`` (a dist-checkpoint index) after ``edit(index)``."""
    path = folder / ".metadata"
    with open(path, "rb") as file:
        index = pickle.load(file)
    edit(index)
    with open(path, "wb") as file:
        pickle.dump(index, file)
