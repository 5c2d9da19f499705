"""Atomic training checkpoints: ``OUTPUT/checkpoints/step_000010/`` is complete or absent.

A checkpoint is written into ``step_000010.tmp/`` and renamed once everything is in it, a ``COMPLETE``
marker last; a run killed mid-save leaves only a ``.tmp`` folder, which resume ignores (and the next save
of that step replaces). Contents:

- ``policy/``: the Megatron policy, a dist-checkpoint (loads at another TP/PP) plus its HF config/tokenizer;
- ``optimizer/``: the optimizer's state (Adam moments, fp32 main params), a dist-checkpoint (``optim_checkpoint``;
  only its description file when the optimizer had not stepped yet);
- ``trainer_state.json``: the step just finished, the data sampler's position, the config used;
- ``rng.pt``: the driver's Python and torch RNG states (plain tensors and numbers).

``trainer.resume=auto`` loads the newest checkpoint that loads: a damaged one (a missing or truncated file,
an index that would run code) is passed over with a log line naming what is wrong. Nothing is unpickled
freely (``models.safe_files``). Pruning (``checkpoint.keep_last``) never deletes a checkpoint newer than
the one just written. A save that fills the disk (``removed_if_disk_full``) removes its own ``.tmp`` folder and
says "no space left on FOLDER", however deep the workers' error was wrapped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmupt_megatron.models.safe_files import check_dist_checkpoint, load_plain
from mmupt_megatron.trainer.optim_checkpoint import saved_without_state

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
                  lambda: saved_without_state(folder / "optimizer") or check_dist_checkpoint(folder / "optimizer")):
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


_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_DISK_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|\[Errno (?:28|122)\]"
    r"|unexpected pos \d+ vs \d+|file write failed"  # torch's zip writer after a short write (the disk filled up)
)


def _disk_full(error: BaseException) -> bool:
    """Whether ``error``, or anything it wraps, says the disk (or the quota) is full: an OSError with ENOSPC /
    EDQUOT, or its text. Followed: causes and contexts, a Ray task error's ``cause``, torch dist-checkpoint's
    ``CheckpointException.failures`` (rank -> (exception, traceback)), megatron's ``Worker failure: ...``."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_DISK_ERRNOS:
            return True
        try:
            if _FULL_DISK_TEXT.search(str(current)):
                return True
        except Exception:  # noqa: BLE001, S110 - an exception whose __str__ fails says nothing here
            pass
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                stack.append(failure[0] if isinstance(failure, tuple) and failure else failure)
        stack.extend(c for c in (getattr(current, "cause", None), current.__cause__, current.__context__)
                     if isinstance(c, BaseException))
    return False


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


@contextmanager
def removed_if_disk_full(tmp: Path) -> Iterator[None]:
    """Around the writing of checkpoint ``tmp`` (the ``.tmp`` folder ``begin`` made): when the disk or the quota
    fills up, remove that partial folder (the space it took; nothing else is touched) and raise an OSError
    (ENOSPC) that says "no space left on FOLDER". Any other error passes through unchanged."""
    assert tmp.name.endswith(".tmp"), tmp
    try:
        yield
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if isinstance(error, KeyboardInterrupt | SystemExit) or not tmp.is_dir() or not _disk_full(error):
            raise  # not a full disk, or the checkpoint was already renamed into place
        shutil.rmtree(tmp, ignore_errors=True)
        final = tmp.name.removesuffix(".tmp")
        removed = (f"{tmp.name} could not be removed entirely: delete it" if tmp.exists() else
                   f"the partial {tmp.name} was removed")
        try:
            free = f"{_size(shutil.disk_usage(tmp.parent).free)} free now"
        except OSError:
            free = "free space unknown"
        raise OSError(errno.ENOSPC, f"no space left on {tmp.parent}: checkpoint {final} could not be written "
                                    f"({removed}; {free}; the complete checkpoints are untouched). Free space "
                                    "there (or lower checkpoint.keep_last), then resume") from error


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
