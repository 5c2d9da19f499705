"""Atomic training checkpoints: ``OUTPUT/checkpoints/step_000010/`` is complete or absent.

A checkpoint is written into ``step_000010.tmp/`` and renamed once everything is in it, a ``COMPLETE``
marker last; a run killed mid-save leaves only a ``.tmp`` folder, which resume ignores (and the next save
of that step replaces). Contents:

- ``policy/``: the Megatron policy, a dist-checkpoint (loads at another TP/PP) plus its HF config/tokenizer;
- ``optimizer/``: the optimizer's state (Adam moments, fp32 main params), a dist-checkpoint (``optim_checkpoint``);
- ``trainer_state.json``: the step just finished, the data sampler's position, the config used;
- ``rng.pt``: the driver's Python and torch RNG states (plain tensors and numbers).

``trainer.resume=auto`` loads the newest checkpoint that loads: a damaged one (a missing or truncated file,
an index that would run code) is passed over with a log line naming what is wrong. Nothing is unpickled
freely (``models.safe_files``). Pruning (``checkpoint.keep_last``) never deletes a checkpoint newer than
the one just written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmupt_megatron.models.safe_files import check_dist_checkpoint, load_plain

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6})$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_of(folder: Path) -> int | None:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def checkpoint_problems(folder: Path) -> list[str]:
    """What keeps ``folder`` from loading as a checkpoint (without loading the tensors); [] if nothing."""
    from mmupt_megatron.models.convert import read_checkpoint_meta

    if not (folder / COMPLETE).is_file():
        return [f"no {COMPLETE} marker (not a checkpoint, or its writing was interrupted)"]
    problems = []
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "sampler" not in state:
            problems.append(f"{STATE_FILE} lacks the step or the sampler state")
    except (OSError, json.JSONDecodeError) as error:
        problems.append(f"{STATE_FILE}: {error}")
    try:
        _check_rng(load_plain(folder / "rng.pt"), folder / "rng.pt")
    except ValueError as error:
        problems.append(str(error))
    for check in (lambda: read_checkpoint_meta(folder / "policy"),
                  lambda: check_dist_checkpoint(folder / "policy" / "megatron"),
                  lambda: check_dist_checkpoint(folder / "optimizer")):
        try:
            check()
        except (ValueError, OSError) as error:
            problems.append(str(error))
    return problems


def resume_candidates(resume: str, output_dir: str | Path) -> list[Path]:
    """``trainer.resume``: auto (complete checkpoints, newest first), never (none), or the folder it names."""
    if resume == "never":
        return []
    if resume == "auto":
        return complete_checkpoints(checkpoints_root(output_dir))[::-1]
    return [Path(resume)]


def load_latest(resume: str, output_dir: str | Path, load: Callable[[Path], dict[str, Any]],
                log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """(folder, trainer state) of the checkpoint ``trainer.resume`` selects, loaded with ``load``; None when
    there is none. With auto, a checkpoint that does not load is passed over for the next older one (and
    ``log`` says so); ValueError when none loads, or when an explicitly named one does not."""
    candidates = resume_candidates(resume, output_dir)
    failures = []
    for folder in candidates:
        problems = checkpoint_problems(folder)
        if not problems:
            try:
                return folder, load(folder)
            except Exception as error:  # noqa: BLE001 - any load failure: try the next older checkpoint
                problems = [_first_line(error)]
        if resume != "auto":
            raise ValueError(f"trainer.resume={resume}: this checkpoint does not load: {'; '.join(problems)}")
        failures.append(f"{folder.name}: {'; '.join(problems)}")
        log(f"checkpoint {folder} does not load ({'; '.join(problems)}): falling back to an older one")
    if failures:
        raise ValueError(f"no checkpoint in {checkpoints_root(output_dir)} loads (trainer.resume=auto):\n  - "
                         + "\n  - ".join(failures))
    return None


def _first_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # a Ray task error carries the worker's exception
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


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


def _check_rng(rng: Any, path: Path) -> None:
    python = rng.get("python") if isinstance(rng, dict) else None
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(rng.get("torch"), torch.Tensor)):
        raise ValueError(f"{path}: not the RNG state this trainer writes")


def read_driver_state(folder: Path) -> dict[str, Any]:
    """The trainer state of ``folder``; restores the driver's RNGs (loaded without unpickling code)."""
    state = json.loads((folder / STATE_FILE).read_text())
    path = folder / "rng.pt"
    rng = load_plain(path)
    _check_rng(rng, path)
    try:
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not a usable RNG state ({error})") from None
    return state


def commit(tmp: Path, *, keep_last: int) -> Path:
    """Mark ``tmp`` complete, rename it into place, and delete all but the newest ``keep_last`` up to it
    (a newer checkpoint, left by a run this one fell back from, is never deleted here)."""
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
    upto = [c for c in complete_checkpoints(final.parent) if step_of(c) <= step_of(final)]
    for old in upto[:-keep_last]:
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
