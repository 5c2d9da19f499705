"""A training run's output folder: apart from the run's inputs, and held by one run at a time.

    self.run_lock = claim_output_dir(cfg)   # in Trainer.__init__, before anything is written or Ray starts

``trainer.output_dir`` receives checkpoints, plots, TensorBoard files, synthesized pools and the final ``hf``
export (each replaced as the run goes), so it may not be ``model.path`` or a data file or folder, lie inside one,
or hold one in those entries. Two trainings on one folder would delete each other's ``.tmp`` checkpoints and
interleave their metrics: the folder is locked (``output_dirs.RunLock``) until ``Trainer.fit`` ends, and the
second run is refused naming the first one's host and pid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from mmupt_megatron.config import Config
from mmupt_megatron.output_dirs import RunLock, check_run_apart
from mmupt_megatron.trainer.preflight import RUN_FILES, check_before_start

WRITTEN = (*RUN_FILES, "hf.tmp")
"""What a run writes into ``trainer.output_dir`` and replaces (the export is staged in ``hf.tmp``)."""


def training_inputs(cfg: Config) -> dict[str, str]:
    """The paths a training run reads, by config key."""
    d = cfg.data
    return {"model.path": cfg.model.path,
            **{f"data.train_files[{i}]": str(f) for i, f in enumerate(d.train_files or [])},
            **{f"data.eval_files[{i}]": str(f) for i, f in enumerate(d.eval_files or [])}}


def claim_output_dir(cfg: Config) -> RunLock:
    """ValueError if ``trainer.output_dir`` would write over an input, if another live run holds it (naming its
    host and pid), or if ``check_before_start`` finds a problem; else the folder's lock, held by this process."""
    out = cfg.trainer.output_dir
    check_run_apart(out, training_inputs(cfg), written=WRITTEN, out_label="trainer.output_dir")
    try:
        lock = RunLock.take(out, label="trainer.output_dir")
    except OSError:
        check_before_start(cfg)  # an unwritable folder: named there, with every other problem
        raise
    try:
        check_before_start(cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def releases_output_dir(fit: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of ``Trainer.fit``: the run's folder is released when it returns or raises (a Trainer that
    never fits releases it when it is collected, or when the process ends)."""

    @functools.wraps(fit)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:  # self: the Trainer
        try:
            return fit(self, *args, **kwargs)
        finally:
            lock = getattr(self, "run_lock", None)
            if lock is not None:
                lock.release()

    return wrapper


__all__ = ["WRITTEN", "claim_output_dir", "releases_output_dir", "training_inputs"]
