"""One nemo-run experiment per launch: a single task, or one task per sweep point; and the status, logs and
cancellation of a submitted experiment.

    text = launch(recipe="qwen2_5_vl_7b_1n8g_tp2", cluster=cluster, overrides=[], dryrun=True)
    exp_id = launch_command(command=["eval", "--model", "/ckpt/hf", "--data", "test.parquet"], cluster=cluster)
    print(experiment_status(exp_id, cluster=cluster))

In dry-run mode nothing is submitted: the experiment renders into a temporary folder and the sbatch scripts
(Slurm) or commands (local) are returned as text. A real Slurm submission first asks Slurm (``sinfo``, through
the cluster's tunnel) whether the partition has the nodes and GPUs the cluster file asks for.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.launch.cluster import ClusterConfig
from mmupt_megatron.launch.executors import (
    REPO_ROOT,
    attach_ray_bootstrap,
    build_executor,
    experiments_base,
    job_folder,
    mmupt_task,
    recipe_argument,
    uses_ray_cluster,
)
from mmupt_megatron.launch.sweep import Sweep

LOG_TAIL_LINES = 20
ERROR_LINE = re.compile(r"mmupt: error: .*")
"""The one line ``mmupt`` prints for an expected failure (``cli_errors.run_command``; Ray's colour codes may precede
it on its line)."""


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    command: list[str]
    """The ``mmupt`` command line of the job (``train RECIPE key=value ...``, ``eval ...``)."""
    recipe: str = ""
    """The recipe of a ``train`` task (checked against the cluster's GPUs)."""
    overrides: tuple[str, ...] = ()


def safe_name(text: str) -> str:
    """A name nemo-run can put into file names and job names unquoted."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "-", text).strip("-")[:120] or "task"


def train(name: str, recipe: str, overrides: list[str] | tuple[str, ...], cluster: ClusterConfig) -> Task:
    return Task(name=safe_name(name), command=["train", recipe_argument(recipe, cluster=cluster), *overrides],
                recipe=recipe, overrides=tuple(overrides))


def check_topology(*, recipe: str, overrides: list[str] | tuple[str, ...], cluster: ClusterConfig) -> None:
    """ValueError when the recipe's TP x PP x DP needs more GPUs than the cluster has; a note when fewer.

    A CPU cluster (gpus_per_node=0) runs the ranks on CPUs: nothing to compare."""
    cfg = load_config(recipe, overrides)
    p = cfg.parallel
    if not cluster.gpus_per_node:
        return
    if p.world_size > cluster.num_gpus:
        raise ValueError(
            f"recipe {recipe!r} needs parallel.tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
            f"{p.tensor_parallel_size} x {p.pipeline_parallel_size} x {p.data_parallel_size} = {p.world_size} GPUs, "
            f"but the cluster has nodes x gpus_per_node = {cluster.nodes} x {cluster.gpus_per_node} = {cluster.num_gpus}"
        )
    if p.world_size < cluster.num_gpus:
        print(f"mmupt launch: note: {recipe} uses {p.world_size} of the cluster's {cluster.num_gpus} GPUs", file=sys.stderr)


def _gres_gpus(gres: str) -> int:
    """GPUs in an sinfo GRES string such as ``gpu:1``, ``gpu:h100:8(S:0-1)`` or ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check_capacity(*, cluster: ClusterConfig, tunnel: Any) -> None:
    """ValueError naming the shortfall when the Slurm partition has fewer nodes or GPUs per node than asked."""
    result = tunnel.run('sinfo -h -N -o "%N|%P|%G"', hide=True, warn=True)
    if result.return_code != 0:
        raise ValueError(f"cannot ask Slurm for its nodes (sinfo exited {result.return_code}: "
                         f"{(result.stderr or result.stdout).strip()[:300]}); is SLURM_CONF set?")
    rows = [line.strip().split("|") for line in result.stdout.splitlines() if line.count("|") == 2]
    default = next((part[:-1] for _, part, _ in rows if part.endswith("*")), "")
    partition = cluster.partition or default
    nodes = {name: _gres_gpus(gres) for name, part, gres in rows if not partition or part.rstrip("*") == partition}
    partition = partition or "(default)"
    short = []
    if len(nodes) < cluster.nodes:
        short.append(f"it has {len(nodes)} node(s) ({', '.join(sorted(nodes)) or 'none'}) and the cluster file asks "
                     f"nodes={cluster.nodes}: {cluster.nodes - len(nodes)} node(s) short")
    have = sorted(nodes.values(), reverse=True)[: cluster.nodes]
    if cluster.gpus_per_node and (not have or min(have) < cluster.gpus_per_node):
        short.append(f"its nodes have {min(have) if have else 0} GPU(s) each and the cluster file asks "
                     f"gpus_per_node={cluster.gpus_per_node}")
    if short:
        raise ValueError(f"Slurm partition {partition!r} cannot run this job: " + "; ".join(short)
                         + " (lower nodes / gpus_per_node with --cluster-set, or pick another partition)")


def build_experiment(*, title: str, tasks: list[Task], cluster: ClusterConfig, base_dir: str):
    """A ``run.Experiment`` with one job per task; the Ray bootstrap goes on Slurm ``train`` tasks."""
    import nemo_run as run

    exp = run.Experiment(safe_name(title), base_dir=base_dir, log_level="WARN")
    exp.__enter__()
    for task in tasks:
        if task.recipe:
            check_topology(recipe=task.recipe, overrides=task.overrides, cluster=cluster)
        exp.add(mmupt_task(cluster=cluster, command=task.command), executor=build_executor(cluster), name=task.name)
        if cluster.kind == "slurm" and uses_ray_cluster(task.command):
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
    """nemo-run's packaging shells out through invoke, which forwards our stdin; a launch needs none."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


@contextlib.contextmanager
def _in_code_checkout(cluster: ClusterConfig) -> Iterator[None]:
    """``packager: git`` on Slurm: nemo-run archives the git checkout of the *current* folder (``git rev-parse
    --show-toplevel``, a raw CalledProcessError anywhere else); the job's code is this repository's, so it runs
    from there. ValueError when this repository is no git checkout (an installed package)."""
    if cluster.kind != "slurm" or cluster.packager != "git":
        yield
        return
    try:
        found = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                               text=True, check=False)
        said = found.stderr.strip().splitlines() or [f"git rev-parse exited {found.returncode}"]
        problem = said[-1] if found.returncode else ""
    except OSError as error:  # no git program
        problem = f"cannot run git ({error.strerror or error})"
    if problem:
        raise ValueError(f"the cluster file's packager: git sends the code as a git archive of {REPO_ROOT}, which is "
                         f"not a git checkout ({problem}): install mmupt-megatron from a git clone (pip install -e .), or set "
                         "packager: none (a container_image holding the code, or a shared file system)")
    with contextlib.chdir(REPO_ROOT):
        yield


def run_tasks(*, title: str, tasks: list[Task], cluster: ClusterConfig, dryrun: bool, wait: bool = False) -> str:
    """Dry-run: the rendered scripts. Otherwise submit (Slurm: detached; local: ``wait`` for completion) and
    return the experiment id (for ``--status/--logs/--cancel``)."""
    if dryrun:
        with tempfile.TemporaryDirectory(prefix="mmupt-launch-") as folder, _stdin_closed():
            exp = build_experiment(title=title, tasks=tasks, cluster=cluster, base_dir=folder)
            try:
                with _in_code_checkout(cluster):
                    exp.dryrun(log=False, delete_exp_dir=False)
                return _rendered(exp, Path(folder), cluster)
            finally:
                exp.__exit__(None, None, None)
    with _stdin_closed():
        exp = build_experiment(title=title, tasks=tasks, cluster=cluster, base_dir=experiments_base(cluster))
        try:
            if cluster.kind == "slurm":
                check_capacity(cluster=cluster, tunnel=exp.jobs[0].executor.tunnel)
            with _in_code_checkout(cluster):
                exp.run(detach=not wait, tail_logs=False, sequential=cluster.kind == "local")
        finally:
            exp.__exit__(None, None, None)
    return exp._id


def launch(*, recipe: str, cluster: ClusterConfig, overrides: list[str] | tuple[str, ...] = (), dryrun: bool = False) -> str:
    name = safe_name(Path(recipe).stem.replace("_", "-"))
    return run_tasks(title=f"mmupt-{name}", tasks=[train(name, recipe, overrides, cluster)], cluster=cluster, dryrun=dryrun)


def launch_command(*, command: list[str], cluster: ClusterConfig, dryrun: bool = False) -> str:
    """Any ``mmupt`` subcommand as the job (``train`` ones get the Ray bootstrap and the topology check)."""
    if command and command[0] == "train":
        recipe, overrides = _split_train(command[1:])
        return launch(recipe=recipe, cluster=cluster, overrides=overrides, dryrun=dryrun)
    name = safe_name(command[0] if command else "task")
    return run_tasks(title=f"mmupt-{name}", tasks=[Task(name=name, command=list(command))], cluster=cluster, dryrun=dryrun)


def _split_train(words: list[str]) -> tuple[str, list[str]]:
    recipes = [w for w in words if "=" not in w]
    if len(recipes) != 1:
        raise ValueError(f"mmupt train takes one RECIPE, got {recipes or 'none'}")
    return recipes[0], [w for w in words if "=" in w]


def launch_sweep(*, sweep: Sweep, cluster: ClusterConfig, overrides: list[str] | tuple[str, ...] = (), dryrun: bool = False) -> str:
    tasks = [train(point.name, sweep.recipe, point.overrides, cluster) for point in sweep.points(overrides)]
    return run_tasks(title=f"mmupt-{sweep.name}", tasks=tasks, cluster=cluster, dryrun=dryrun)


# ---- a submitted experiment: status, logs, cancel (through nemo-run) ----

def load_experiment(exp_id: str, *, cluster: ClusterConfig | None):
    """The nemo-run ``Experiment`` with this id, from the cluster file's ``job_dir`` (or nemo-run's home)."""
    import nemo_run as run
    from nemo_run.config import get_nemorun_home, set_nemorun_home

    base = experiments_base(cluster) if cluster else get_nemorun_home()
    title = exp_id.rpartition("_")[0]
    folder = Path(base) / "experiments" / title / exp_id
    if not title or not folder.is_dir():
        known = sorted(p.name for p in (Path(base) / "experiments").glob("*/*") if p.is_dir())[-5:]
        raise ValueError(f"no experiment {exp_id!r} under {base}/experiments (pass the --cluster file it was launched "
                         f"with; latest there: {', '.join(known) or 'none'})")
    saved = get_nemorun_home()
    set_nemorun_home(base)
    try:
        return run.Experiment.from_id(exp_id)
    finally:
        set_nemorun_home(saved)


def _task_logs(job: Any, slurm_id: str) -> list[Path]:
    folder = Path(job_folder(job.executor)) if hasattr(job.executor, "tunnel") else Path(job.executor.job_dir)
    logs = sorted(folder.glob(f"log-*{slurm_id}*.out")) + sorted(folder.glob(f"sbatch_*{slurm_id}*.out"))
    return logs or sorted(folder.glob("log*.out")) + sorted(folder.glob("*.log"))


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def experiment_status(exp_id: str, *, cluster: ClusterConfig | None) -> str:
    """One line per task (name, state, Slurm job id, log file); a failed task adds its log's last lines, and its
    ``mmupt: error:`` line when other output followed it (Ray's logs after a lost node: the cause, not noise)."""
    exp = load_experiment(exp_id, cluster=cluster)
    with _stdin_closed():
        table = exp.status(return_dict=True) or {}
    out = []
    for job in exp.jobs:
        info = table.get(job.id, {})
        state = getattr(info.get("status"), "name", str(info.get("status", "UNKNOWN")))
        slurm_id = str(info.get("job_id", ""))
        logs = _task_logs(job, slurm_id)
        out.append(f"{job.id}: {state} (job {slurm_id or '?'}; log {logs[0] if logs else 'not written yet'})")
        if state in ("FAILED", "CANCELLED") and logs:
            tail = _tail(logs[0], LOG_TAIL_LINES)
            errors = ERROR_LINE.findall(logs[0].read_text(errors="replace"))
            if errors and errors[-1] not in tail:
                out.append(f"  {errors[-1]}")
            out.append(f"  last lines of {logs[0]}:")
            out += [f"    {line}" for line in tail.splitlines()]
    return "\n".join(out)


def experiment_logs(exp_id: str, *, cluster: ClusterConfig | None) -> str:
    exp = load_experiment(exp_id, cluster=cluster)
    with _stdin_closed():
        table = exp.status(return_dict=True) or {}
    out = []
    for job in exp.jobs:
        for path in _task_logs(job, str(table.get(job.id, {}).get("job_id", ""))):
            out.append(f"### {job.id}: {path}\n{path.read_text(errors='replace')}")
    return "\n".join(out) or f"{exp_id}: no logs written yet"


def cancel_experiment(exp_id: str, *, cluster: ClusterConfig | None) -> str:
    exp = load_experiment(exp_id, cluster=cluster)
    with _stdin_closed():
        for job in exp.jobs:
            exp.cancel(job.id)
    return f"cancelled {', '.join(job.id for job in exp.jobs)} of {exp_id}"
