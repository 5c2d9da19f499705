"""nemo-run executors and the job's task, built from a ``ClusterConfig``.

    executor = build_executor(cluster)                        # SlurmExecutor or LocalExecutor
    task = mmupt_task(cluster=cluster, command=["train", "qwen2_5_vl_7b_1n8g_tp2", "trainer.steps=10"])

On Slurm a ``train`` task is ``python -m mmupt_megatron.cli train RECIPE ... trainer.ray_address=$ray_address``,
run on the head node once the Ray bootstrap (``ray_bootstrap.py``, attached by ``attach_ray_bootstrap`` after the
executor has its job folder) has all GPUs; any other ``mmupt`` subcommand (eval, synthesize, convert, ...) runs
as it is. Locally it is the same command without an address (the trainer starts its own Ray).

Everything that reaches the sbatch script from a cluster file or the command line is shell-quoted here
(``shlex.quote``); what nemo-run itself writes unquoted (``job_dir``) is checked by ``ClusterConfig.problems``.
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
RAY_ADDRESS_ARG = '"trainer.ray_address=$ray_address"'


def experiments_base(cluster: ClusterConfig) -> str:
    """The nemo-run home of this cluster's experiments: ``job_dir`` (absolute) or nemo-run's default."""
    from nemo_run.config import get_nemorun_home

    return os.path.abspath(os.path.expanduser(cluster.job_dir)) if cluster.job_dir else get_nemorun_home()


def _tunnel(cluster: ClusterConfig) -> Any:
    import nemo_run as run

    if cluster.tunnel.kind == "ssh":
        return run.SSHTunnel(
            host=cluster.tunnel.host, user=cluster.tunnel.user, job_dir=cluster.job_dir,
            identity=cluster.tunnel.identity or None,
        )
    # a local tunnel must point at the experiment's own folder: nemo-run copies job files only over SSH, so
    # sbatch finds its script only where the experiment (base_dir=experiments_base) wrote it
    return run.LocalTunnel(job_dir=os.path.join(experiments_base(cluster), "experiments"))


def _packager(cluster: ClusterConfig) -> Any:
    import nemo_run as run

    return run.GitArchivePackager() if cluster.packager == "git" else run.Packager()


def _workdir_flags(cluster: ClusterConfig) -> list[str]:
    """packager=none without a container: run in this checkout (nemo-run would pick an empty code folder)."""
    return ["--chdir", str(REPO_ROOT)] if cluster.packager == "none" and not cluster.container_image else []


def build_executor(cluster: ClusterConfig) -> Any:
    """A nemo-run executor: ``SlurmExecutor`` (one task per node) or ``LocalExecutor``. A ``ClusterConfig`` made
    in code is checked as ``load_cluster`` checks a file: nothing unvalidated reaches the sbatch script."""
    import nemo_run as run

    problems = cluster.problems()
    if problems:
        raise ValueError("cluster: " + "; ".join(problems))

    if cluster.kind == "local":
        return run.LocalExecutor(ntasks_per_node=1, env_vars=dict(cluster.env))
    return run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition or None,
        nodes=cluster.nodes,
        ntasks_per_node=1,
        gpus_per_node=cluster.gpus_per_node or None,  # None: no --gpus-per-node (CPU partitions)
        time=cluster.time,
        container_image=cluster.container_image or None,
        container_mounts=list(cluster.mounts),
        env_vars={key: shlex.quote(value) for key, value in cluster.env.items()},  # nemo-run writes export K=V
        srun_args=[*HEAD_SRUN_ARGS, *_workdir_flags(cluster)],
        tunnel=_tunnel(cluster),
        packager=_packager(cluster),
        exclusive=True,
    )


def job_folder(executor: Any) -> str:
    """Where the job's sbatch script and logs live on the cluster."""
    return os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)


def container_flags(*, executor: Any, cluster: ClusterConfig) -> list[str]:
    """The srun container / working-folder flags nemo-run gives its own command, for the Ray sruns."""
    if not cluster.container_image:
        return _workdir_flags(cluster) or ["--chdir", os.path.join(job_folder(executor), "code")]
    mounts = ",".join([*cluster.mounts, f"{job_folder(executor)}:{RUNDIR}"])
    return ["--container-image", cluster.container_image, "--container-mounts", mounts,
            "--container-workdir", f"{RUNDIR}/code"]


def attach_ray_bootstrap(*, executor: Any, cluster: ClusterConfig) -> None:
    """Give an assigned ``SlurmExecutor`` (one whose job folder is known) the Ray bootstrap as setup lines."""
    executor.setup_lines = ray_bootstrap_lines(
        cluster=cluster, container_flags=container_flags(executor=executor, cluster=cluster), log_dir=job_folder(executor),
    )


def recipe_argument(recipe: str, *, cluster: ClusterConfig) -> str:
    """How the job names the recipe: its name in configs/, a repo-relative path, or (locally) any path."""
    path = resolve_recipe(recipe).resolve()
    if path.parent == CONFIG_DIR.resolve():
        return path.stem
    if cluster.kind == "local" or cluster.packager == "none":
        return str(path)
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        raise ValueError(
            f"recipe {recipe!r} is outside the repository ({REPO_ROOT}); the job only sees the repository "
            "(packager: git), so put it under configs/"
        ) from None


def uses_ray_cluster(command: list[str] | tuple[str, ...]) -> bool:
    """Only ``mmupt train`` runs on the job's Ray cluster; other subcommands need no bootstrap."""
    return bool(command) and command[0] == "train"


def mmupt_task(*, cluster: ClusterConfig, command: list[str] | tuple[str, ...]) -> Any:
    """A ``run.Script`` running ``mmupt COMMAND...`` (``train`` gets the job's Ray address on Slurm).

    On Slurm nemo-run joins entrypoint and arguments into a shell line, so each is quoted here; locally they
    are an argv (no shell), passed as they are. Locally the default ``python`` becomes the current
    interpreter, so the task sees this environment."""
    import nemo_run as run

    if not command:
        raise ValueError("mmupt launch needs a command: RECIPE (train) or -- SUBCOMMAND [ARGS ...]")
    python = sys.executable if cluster.kind == "local" and cluster.python in ("python", "") else cluster.python
    if cluster.kind == "local":
        return run.Script(path="mmupt_megatron.cli", args=list(command), entrypoint=python, m=True)
    args = [shlex.quote(word) for word in command]
    if uses_ray_cluster(command):
        args.append(RAY_ADDRESS_ARG)
    return run.Script(path="mmupt_megatron.cli", args=args, entrypoint=shlex.quote(python), m=True)


def train_task(
    *, cluster: ClusterConfig, recipe: str, overrides: list[str] | tuple[str, ...] = (),
    command: tuple[str, ...] = ("train",),
) -> Any:
    """``mmupt <command> RECIPE overrides`` as a task (see ``mmupt_task``)."""
    return mmupt_task(cluster=cluster, command=[*command, recipe_argument(recipe, cluster=cluster), *overrides])
