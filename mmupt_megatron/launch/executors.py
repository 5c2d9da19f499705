"""nemo-run executors and the training task, built from a ``ClusterConfig``.

    executor = build_executor(cluster)                        # SlurmExecutor or LocalExecutor
    task = train_task(cluster=cluster, recipe="qwen2_5_vl_7b_1n8g_tp2", overrides=["trainer.steps=10"])

On Slurm the task is ``python -m mmupt_megatron.cli train RECIPE ... trainer.ray_address=$ray_address``, run
on the head node once the Ray bootstrap (``ray_bootstrap.py``, attached by ``attach_ray_bootstrap`` after the
executor has its job folder) has all GPUs. Locally it is the same command without an address (the trainer
starts its own Ray).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from mmupt_megatron.config_loading import CONFIG_DIR, resolve_recipe
from mmupt_megatron.launch.cluster import ClusterConfig
from mmupt_megatron.launch.ray_bootstrap import ray_bootstrap_lines

REPO_ROOT = CONFIG_DIR.parent
RUNDIR = "/nemo_run"  # where nemo-run mounts the job folder inside the container
HEAD_SRUN_ARGS = ["--nodes=1", "--ntasks=1", "--relative=0", "--overlap"]


def _tunnel(cluster: ClusterConfig) -> Any:
    import nemo_run as run

    if cluster.tunnel.kind == "ssh":
        return run.SSHTunnel(
            host=cluster.tunnel.host, user=cluster.tunnel.user, job_dir=cluster.job_dir,
            identity=cluster.tunnel.identity or None,
        )
    return run.LocalTunnel(job_dir=cluster.job_dir)


def _packager(cluster: ClusterConfig) -> Any:
    import nemo_run as run

    return run.GitArchivePackager() if cluster.packager == "git" else run.Packager()


def build_executor(cluster: ClusterConfig) -> Any:
    """A nemo-run executor: ``SlurmExecutor`` (one task per node) or ``LocalExecutor``."""
    import nemo_run as run

    if cluster.kind == "local":
        return run.LocalExecutor(ntasks_per_node=1, env_vars=dict(cluster.env))
    return run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition or None,
        nodes=cluster.nodes,
        ntasks_per_node=1,
        gpus_per_node=cluster.gpus_per_node,
        time=cluster.time,
        container_image=cluster.container_image or None,
        container_mounts=list(cluster.mounts),
        env_vars=dict(cluster.env),
        srun_args=list(HEAD_SRUN_ARGS),
        tunnel=_tunnel(cluster),
        packager=_packager(cluster),
        exclusive=True,
    )


def container_flags(*, executor: Any, cluster: ClusterConfig) -> list[str]:
    """The srun container flags nemo-run gives its own command, for the Ray sruns (same image and mounts)."""
    job_folder = os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)
    if not cluster.container_image:
        return ["--chdir", os.path.join(job_folder, "code")]
    mounts = ",".join([*cluster.mounts, f"{job_folder}:{RUNDIR}"])
    return ["--container-image", cluster.container_image, "--container-mounts", mounts,
            "--container-workdir", f"{RUNDIR}/code"]


def attach_ray_bootstrap(*, executor: Any, cluster: ClusterConfig) -> None:
    """Give an assigned ``SlurmExecutor`` (one whose job folder is known) the Ray bootstrap as setup lines."""
    log_dir = os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)
    executor.setup_lines = ray_bootstrap_lines(
        cluster=cluster, container_flags=container_flags(executor=executor, cluster=cluster), log_dir=log_dir,
    )


def recipe_argument(recipe: str, *, cluster: ClusterConfig) -> str:
    """How the job names the recipe: its name in configs/, a repo-relative path, or (locally) any path."""
    path = resolve_recipe(recipe).resolve()
    if path.parent == CONFIG_DIR.resolve():
        return path.stem
    if cluster.kind == "local":
        return str(path)
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        raise ValueError(
            f"recipe {recipe!r} is outside the repository ({REPO_ROOT}); the job only sees the repository "
            "(packager: git), so put it under configs/"
        ) from None


def train_task(
    *, cluster: ClusterConfig, recipe: str, overrides: list[str] | tuple[str, ...] = (),
    command: tuple[str, ...] = ("train",),
) -> Any:
    """A ``run.Script`` running ``mmupt <command> RECIPE overrides`` (plus the Ray address on Slurm).

    Locally the default ``python`` becomes the current interpreter, so the task sees this environment."""
    import nemo_run as run

    args = [*command, recipe_argument(recipe, cluster=cluster), *[shlex.quote(o) for o in overrides]]
    if cluster.kind == "slurm" and command == ("train",):
        args.append('"trainer.ray_address=$ray_address"')
    python = sys.executable if cluster.kind == "local" and cluster.python == "python" else cluster.python
    return run.Script(path="mmupt_megatron.cli", args=args, entrypoint=python, m=True)
