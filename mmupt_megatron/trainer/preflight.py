"""Checks a training run passes before Ray starts: the model folder and the parallel layout it allows, the
output folder (writable; a folder holding an earlier run is continued, never overwritten), ``trainer.resume``.

    check_before_start(cfg)   # ValueError listing every problem, each naming its config key
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mmupt_megatron.config import Config
from mmupt_megatron.output_dirs import is_owned, mark_owned, remove_owned
from mmupt_megatron.trainer import checkpoint as ckpt

RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "hf", "plots", "synthesis")
"""What a training run writes into ``trainer.output_dir``: a folder holding any of them holds a run."""


def check_before_start(cfg: Config) -> None:
    """ValueError listing every problem; else the output folder exists and is marked as a run's."""
    problems = model_problems(cfg) + output_problems(cfg)
    if problems:
        raise ValueError("cannot start training:\n  - " + "\n  - ".join(problems))
    if not is_owned(cfg.trainer.output_dir):
        mark_owned(cfg.trainer.output_dir, kind="train")


def remove_previous_run(out: str | Path) -> None:
    """Delete ``out`` if it holds an earlier training run (marked, or only what a run writes); ValueError if it
    holds anything else (the demo replaces its own runs this way)."""
    path = Path(out)
    if not path.exists():
        return
    if path.is_dir() and not is_owned(path) and {p.name for p in path.iterdir()} <= set(RUN_FILES):
        mark_owned(path, kind="train")  # written before runs were marked
    remove_owned(path, out_label="trainer.output_dir")


def model_problems(cfg: Config) -> list[str]:
    from mmupt_megatron.distributed.parallel import ParallelDims
    from mmupt_megatron.models.hf_config import load_arch

    if not cfg.model.path:
        return ["model.path is empty: set it to a Hugging Face Qwen2.5-VL / Qwen2 folder"]
    path = Path(cfg.model.path)
    if not path.is_dir():
        return [f"model.path={path}: no such folder"]
    try:
        arch = load_arch(path)
    except (ValueError, OSError) as error:
        return [f"model.path={path}: {error}"]
    p = cfg.parallel
    dims = ParallelDims(tp=p.tensor_parallel_size, pp=p.pipeline_parallel_size, dp=p.data_parallel_size)
    try:
        dims.validate(world_size=dims.world_size, num_attention_heads=arch.num_attention_heads,
                      num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers)
    except ValueError as error:
        return [(f"parallel.tensor_parallel_size={dims.tp} / parallel.pipeline_parallel_size={dims.pp} do not fit "
                 f"the model at model.path={path}: {error}")]
    return []


def run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def output_problems(cfg: Config) -> list[str]:
    out, resume = Path(cfg.trainer.output_dir), cfg.trainer.resume
    where = f"trainer.output_dir={out}"
    used = run_files(out) if out.is_dir() else []
    root = ckpt.checkpoints_root(out)
    problems = []
    if resume == "never" and used:
        problems.append(f"{where} already holds a run ({', '.join(used)}); trainer.resume=never would overwrite its "
                        "history: choose a new trainer.output_dir, or set trainer.resume=auto to continue that run")
    elif resume == "auto" and used and not ckpt.complete_checkpoints(root):
        problems.append(f"{where} holds a run ({', '.join(used)}) but no complete checkpoint, so trainer.resume=auto "
                        "cannot continue it (and would overwrite its history): choose a new trainer.output_dir")
    elif resume not in ("auto", "never"):
        named = Path(resume)
        if not (named / ckpt.COMPLETE).is_file():
            problems.append(f"trainer.resume={resume}: must be auto, never or a complete checkpoint folder "
                            f"(OUTPUT/checkpoints/step_NNNNNN with a {ckpt.COMPLETE} marker)")
        elif used and named.resolve().parent != root.resolve():
            problems.append(f"{where} already holds a run ({', '.join(used)}); resuming trainer.resume={resume} (another "
                            "run's checkpoint) into it would mix the two: choose a new trainer.output_dir")
        elif used:
            newer = [c.name for c in ckpt.complete_checkpoints(root) if ckpt.step_of(c) > (ckpt.step_of(named) or -1)]
            if newer:
                problems.append(f"trainer.resume={resume} is older than {newer[-1]} in {where}: continuing from it would "
                                "overwrite the later steps of that run; resume it into a new trainer.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".mmupt-write-test-"):
            pass
    except OSError as error:
        problems.append(f"{where} is not writable: {error.strerror or error}")
    return problems
