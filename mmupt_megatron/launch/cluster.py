"""The cluster a recipe is launched on: a small typed config loaded from YAML (configs/clusters/*.yaml).

    from mmupt_megatron.launch.cluster import load_cluster
    cluster = load_cluster("configs/clusters/example_slurm.yaml", ["nodes=4"])

``kind: slurm`` builds a nemo-run ``SlurmExecutor`` (Ray head + workers inside the job); ``kind: local`` a
``LocalExecutor`` for a workstation. The tunnel (how we reach Slurm) is ``local`` when launching from a login
node and ``ssh`` (host + user) from elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mmupt_megatron.config_loading import COMMAND_LINE, check_problems, merge_layers, parse_overrides, read_yaml

SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_.+/-]+")
"""Paths nemo-run may write unquoted into a shell script."""


@dataclass(kw_only=True)
class TunnelConfig:
    kind: str = "local"
    """local (submit from a login node) or ssh."""
    host: str = ""
    """SSH host of the login node (kind=ssh)."""
    user: str = ""
    """SSH user (kind=ssh)."""
    identity: str = ""
    """Optional SSH private key file (kind=ssh); empty uses the agent / password."""

    def problems(self) -> list[str]:
        if self.kind not in ("local", "ssh"):
            return [f"tunnel.kind must be local or ssh, got {self.kind!r}"]
        if self.kind == "ssh":
            return [f"tunnel.{name} is required when tunnel.kind=ssh" for name in ("host", "user") if not getattr(self, name)]
        return []


@dataclass(kw_only=True)
class ClusterConfig:
    kind: str = "slurm"
    """slurm (sbatch job with a Ray cluster over its nodes) or local (this workstation)."""
    account: str = ""
    """Slurm account (kind=slurm)."""
    partition: str = ""
    """Slurm partition (kind=slurm)."""
    nodes: int = 1
    """Nodes of the job; the recipe's TP x PP x DP must equal nodes x gpus_per_node."""
    gpus_per_node: int = 8
    """GPUs per node (8 for a DGX H100); 0 for a CPU partition (no --gpus-per-node; Ray counts CPUs)."""
    cpus_per_node: int = 0
    """CPUs Ray may use per node; 0 lets Ray detect them."""
    time: str = "04:00:00"
    """Slurm time limit (HH:MM:SS or D-HH:MM:SS)."""
    container_image: str = ""
    """Container image (pyxis/enroot) with this package and its GPU extra installed; empty runs on the host."""
    mounts: list[str] = field(default_factory=list)
    """Container mounts, SRC:DST (checkpoints, data, output)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported in the job."""
    job_dir: str = ""
    """Where nemo-run keeps experiments, job files and logs (kind=slurm with a local tunnel: a folder the nodes
    share; ssh: a folder on the cluster); empty: ~/.nemo_run. Letters, digits and ``._+-/`` only (nemo-run writes
    it unquoted into the sbatch script)."""
    packager: str = "git"
    """How the code reaches the job: git (git archive of HEAD, unpacked as the job's working folder) or none
    (the job runs in this checkout, which the nodes must share)."""
    python: str = "python"
    """Python executable in the job (kind=local: empty means the current interpreter)."""
    ray_port: int = 6379
    """Port of the Ray head (GCS)."""
    ray_wait_s: int = 600
    """How long the job waits for every node's GPUs to join the Ray cluster before failing."""
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    """How to reach the Slurm login node."""

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("slurm", "local"):
            out.append(f"kind must be slurm or local, got {self.kind!r}")
        if self.kind == "slurm" and not self.account:
            out.append("account is required when kind=slurm")
        for name in ("nodes", "ray_port", "ray_wait_s"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "cpus_per_node"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.job_dir and not SHELL_SAFE_PATH.fullmatch(self.job_dir):
            out.append(f"job_dir {self.job_dir!r} may hold only letters, digits and ._+-/ (nemo-run 0.11.1 writes it "
                       "unquoted into the sbatch script and its srun lines)")
        if re.search(r"/nemo_run(/|$)", self.job_dir) and not self.container_image:
            out.append(f"job_dir {self.job_dir!r} holds '/nemo_run', which nemo-run 0.11.1 rewrites in the sbatch script "
                       "of a job without container_image (its in-container job folder); pick another folder name")
        if self.kind == "slurm" and not self.python:
            out.append("python must name the job's Python executable when kind=slurm")
        out += [f"env key {k!r} must be a shell variable name (letters, digits, _)" for k in self.env
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if self.kind == "local" and self.nodes != 1:
            out.append(f"nodes must be 1 when kind=local, got {self.nodes}")
        if self.packager not in ("git", "none"):
            out.append(f"packager must be git or none, got {self.packager!r}")
        out += [m for m in (f"mounts entry {m!r} must look like SRC:DST" for m in self.mounts if ":" not in m)]
        out += self.tunnel.problems()
        return out


def load_cluster(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """The validated ``ClusterConfig`` of a YAML file plus ``key=value`` overrides (the recipe loader's rules:
    unknown keys with a suggestion, bad values and problems naming the file or the command line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster file {str(path)!r} does not exist")
    layers = [(str(path), read_yaml(path, what="a cluster file")), (COMMAND_LINE, parse_overrides(overrides))]
    cluster, origins = merge_layers(ClusterConfig, layers, overrides)
    check_problems(cluster, origins, what=f"cluster file {path}")
    return cluster
