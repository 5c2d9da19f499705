"""One nemo-run experiment per launch: a single training task, or one task per sweep point.

    text = launch(recipe="qwen2_5_vl_7b_1n8g_tp2", cluster=cluster, overrides=[], dryrun=True)

In dry-run mode nothing is submitted: the experiment renders into a temporary folder and the sbatch scripts
(Slurm) or commands (local) are returned as text.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.launch.cluster import ClusterConfig
from mmupt_megatron.launch.executors import attach_ray_bootstrap, build_executor, train_task
from mmupt_megatron.launch.sweep import Sweep


def check_topology(*, recipe: str, overrides: list[str] | tuple[str, ...], cluster: ClusterConfig) -> None:
    """ValueError when the recipe's TP x PP x DP needs more GPUs than the cluster has; a note when fewer."""
    cfg = load_config(recipe, overrides)
    p = cfg.parallel
    if p.world_size > cluster.num_gpus:
        raise ValueError(
            f"recipe {recipe!r} needs parallel.tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
            f"{p.tensor_parallel_size} x {p.pipeline_parallel_size} x {p.data_parallel_size} = {p.world_size} GPUs, "
            f"but the cluster has nodes x gpus_per_node = {cluster.nodes} x {cluster.gpus_per_node} = {cluster.num_gpus}"
        )
    if p.world_size < cluster.num_gpus:
        print(f"mmupt launch: note: {recipe} uses {p.world_size} of the cluster's {cluster.num_gpus} GPUs", file=sys.stderr)


def build_experiment(*, title: str, tasks: list[tuple[str, str, list[str]]], cluster: ClusterConfig, base_dir: str | None):
    """A ``run.Experiment`` with one task per (name, recipe, overrides); the Ray bootstrap goes on Slurm tasks."""
    import nemo_run as run

    exp = run.Experiment(title, base_dir=base_dir, log_level="WARN")
    exp.__enter__()
    for name, recipe, overrides in tasks:
        check_topology(recipe=recipe, overrides=overrides, cluster=cluster)
        exp.add(train_task(cluster=cluster, recipe=recipe, overrides=overrides), executor=build_executor(cluster), name=name)
        if cluster.kind == "slurm":
            attach_ray_bootstrap(executor=exp.jobs[-1].executor, cluster=cluster)
    return exp


def _rendered(exp, folder: Path, cluster: ClusterConfig) -> str:
    if cluster.kind == "slurm":
        scripts = sorted(folder.rglob("*_sbatch.sh"))
        assert scripts, f"nemo-run rendered no sbatch script under {folder}"
        return "\n".join(f"### {p.name}\n{p.read_text()}" for p in scripts)
    return "\n".join(f"### {job.id}\n" + " ".join(job.task.to_command(with_entrypoint=True)) for job in exp.jobs)


@contextlib.contextmanager
def _stdin_closed() -> Iterator[None]:
    """nemo-run's packaging shells out through invoke, which forwards our stdin; a dry-run needs none."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


def run_tasks(*, title: str, tasks: list[tuple[str, str, list[str]]], cluster: ClusterConfig, dryrun: bool,
              wait: bool = False) -> str:
    """Dry-run: the rendered scripts. Otherwise submit (Slurm: detached; local: ``wait`` for completion)."""
    if dryrun:
        with tempfile.TemporaryDirectory(prefix="mmupt-launch-") as folder, _stdin_closed():
            exp = build_experiment(title=title, tasks=tasks, cluster=cluster, base_dir=folder)
            try:
                exp.dryrun(log=False, delete_exp_dir=False)
                return _rendered(exp, Path(folder), cluster)
            finally:
                exp.__exit__(None, None, None)
    exp = build_experiment(title=title, tasks=tasks, cluster=cluster, base_dir=None)
    try:
        exp.run(detach=not wait, tail_logs=False, sequential=cluster.kind == "local")
    finally:
        exp.__exit__(None, None, None)
    return exp._id


def launch(*, recipe: str, cluster: ClusterConfig, overrides: list[str] | tuple[str, ...] = (), dryrun: bool = False) -> str:
    name = Path(recipe).stem.replace("_", "-")
    return run_tasks(title=f"mmupt-{name}", tasks=[(name, recipe, list(overrides))], cluster=cluster, dryrun=dryrun)


def launch_sweep(*, sweep: Sweep, cluster: ClusterConfig, overrides: list[str] | tuple[str, ...] = (), dryrun: bool = False) -> str:
    tasks = [(point.name, sweep.recipe, point.overrides) for point in sweep.points(overrides)]
    return run_tasks(title=f"mmupt-{sweep.name}", tasks=tasks, cluster=cluster, dryrun=dryrun)
