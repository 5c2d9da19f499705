"""The cluster a recipe is launched on: a small typed config loaded from YAML (configs/clusters/*.yaml).

    from mmupt_megatron.launch.cluster import load_cluster
    cluster = load_cluster("configs/clusters/example_slurm.yaml", ["nodes=4"])

``kind: slurm`` builds a nemo-run ``SlurmExecutor`` (Ray head + workers inside the job); ``kind: local`` a
``LocalExecutor`` for a workstation. The tunnel (how we reach Slurm) is ``local`` when launching from a login
node and ``ssh`` (host + user) from elsewhere.

nemo-run 0.11.1 writes the cluster file's values into the sbatch script with little or no quoting:
``container_image``, ``mounts`` and ``job_dir`` bare on its ``srun`` line, ``account`` there too (in the job
name of the log path), ``account`` / ``partition`` / ``time`` in ``#SBATCH`` headers whose single quotes a
newline escapes (a command line, or another ``#SBATCH`` directive), and ``tunnel.*`` into the rsync / ssh
commands it runs. So ``load_cluster`` refuses, before anything is rendered, any of those values that does not
match the strict pattern of what Slurm, pyxis and ssh accept (no shell characters, whitespace or newlines),
naming the file and the field; the free-text values (``env`` values, ``python``) are shell-quoted where the
script is built (``executors.py``, ``ray_bootstrap.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from mmupt_megatron.config_loading import (
    COMMAND_LINE,
    check_problems,
    merge_layers,
    parse_overrides,
    read_yaml,
)

SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_.+/-]+")
"""Paths nemo-run may write unquoted into a shell script."""
SLURM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A Slurm account or partition name."""
SLURM_NAMES = re.compile(rf"{SLURM_NAME.pattern}(?:,{SLURM_NAME.pattern})*")
"""A comma list of Slurm partitions (``batch,gpu``)."""
SLURM_TIME = re.compile(r"[0-9]+(?::[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(?::[0-9]{1,2}){0,2}|UNLIMITED|INFINITE")
"""Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or UNLIMITED)."""
_PATH = r"[A-Za-z0-9_.+/][A-Za-z0-9_.+/-]*"  # SHELL_SAFE_PATH not starting with '-' (no srun option)
CONTAINER_IMAGE = re.compile(
    r"(?:docker://)?(?:[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]+)?[/#])?"  # registry[:port]/ (or enroot's registry#)
    r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*"  # path
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"  # :tag, @sha256:digest
    rf"|{_PATH}\.sqsh"  # a squashfs file (enroot import)
)
"""A container image reference (``nvcr.io/nvidia/pytorch:24.05-py3``, ``...@sha256:DIGEST``) or a .sqsh file."""
CONTAINER_MOUNT = re.compile(rf"{_PATH}:/[A-Za-z0-9_.+/-]*(?::[A-Za-z0-9_=+-]+)?")
"""A pyxis mount, SRC:DST[:FLAGS] (DST absolute; no ',' which separates mounts)."""
HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
"""An ssh host name or IPv4 address."""
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""An ssh user name."""
IDENTITY_FILE = re.compile(rf"(?:~/)?{_PATH}")
"""An ssh private key file (``~/`` allowed in front)."""
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""An environment variable name."""


def _strict(name: str, value: str, pattern: re.Pattern[str], rule: str, *, into: str = "the sbatch script"
            ) -> list[str]:
    """``[problem]`` when a value nemo-run writes unquoted does not match its pattern in full."""
    if pattern.fullmatch(value):
        return []
    return [(f"{name} {value!r} {rule} (no spaces, newlines or shell characters: nemo-run 0.11.1 writes it "
             f"unquoted into {into})")]


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
        out = []
        if self.kind == "ssh":
            out += [f"tunnel.{name} is required when tunnel.kind=ssh" for name in ("host", "user")
                    if not getattr(self, name)]
        for name, pattern, rule in (
            ("host", HOST_NAME, "must be a host name or IPv4 address"),
            ("user", USER_NAME, "must be a user name (letters, digits, _.-)"),
            ("identity", IDENTITY_FILE, "must be a path of letters, digits and ._+-/ (~/ in front)"),
        ):
            if getattr(self, name):
                out += _strict(f"tunnel.{name}", getattr(self, name), pattern, rule, into="its rsync and ssh commands")
        return out


@dataclass(kw_only=True)
class ClusterConfig:
    kind: str = "slurm"
    """slurm (sbatch job with a Ray cluster over its nodes) or local (this workstation)."""
    account: str = ""
    """Slurm account (kind=slurm): letters, digits and ``_.-``."""
    partition: str = ""
    """Slurm partition (kind=slurm), or a comma list of them: letters, digits and ``_.-``."""
    nodes: int = 1
    """Nodes of the job; the recipe's TP x PP x DP must equal nodes x gpus_per_node."""
    gpus_per_node: int = 8
    """GPUs per node (8 for a DGX H100); 0 for a CPU partition (no --gpus-per-node; Ray counts CPUs)."""
    cpus_per_node: int = 0
    """CPUs Ray may use per node; 0 lets Ray detect them."""
    time: str = "04:00:00"
    """Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    container_image: str = ""
    """Container image (pyxis/enroot) with this package and its GPU extra installed; empty runs on the host. A
    reference (``nvcr.io/nvidia/pytorch:24.05-py3``, ``...@sha256:DIGEST``) or a ``.sqsh`` file."""
    mounts: list[str] = field(default_factory=list)
    """Container mounts, SRC:DST[:FLAGS] (checkpoints, data, output): paths of letters, digits and ``._+-/``."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported in the job (names: letters, digits, _; values: any text, shell-quoted)."""
    job_dir: str = ""
    """Where nemo-run keeps experiments, job files and logs (kind=slurm with a local tunnel: a folder the nodes
    share; ssh: a folder on the cluster); empty: ~/.nemo_run. Letters, digits and ``._+-/`` only (nemo-run writes
    it unquoted into the sbatch script)."""
    packager: str = "git"
    """How the code reaches the job: git (git archive of HEAD, unpacked as the job's working folder) or none
    (the job runs in this checkout, which the nodes must share)."""
    python: str = "python"
    """Python executable in the job, shell-quoted (kind=local: empty means the current interpreter)."""
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
        if self.python and "python" not in self.python:
            out.append(f"python {self.python!r} must hold 'python' (nemo-run 0.11.1 runs it as PYTHON -m and asserts so)")
        out += [f"env key {k!r} must be a shell variable name (letters, digits, _)" for k in self.env
                if not SHELL_NAME.fullmatch(k)]
        if self.kind == "local" and self.nodes != 1:
            out.append(f"nodes must be 1 when kind=local, got {self.nodes}")
        if self.packager not in ("git", "none"):
            out.append(f"packager must be git or none, got {self.packager!r}")
        out += self._script_value_problems()
        out += self.tunnel.problems()
        return out

    def _script_value_problems(self) -> list[str]:
        """The values nemo-run writes unquoted into the sbatch script (#SBATCH headers, srun flags), each held to
        the strict pattern of what Slurm / pyxis accept."""
        out = []
        if self.account:
            out += _strict("account", self.account, SLURM_NAME, "must be a Slurm account name (letters, digits, _.-)")
        if self.partition:
            out += _strict("partition", self.partition, SLURM_NAMES,
                           "must be a Slurm partition name or a comma list of them (letters, digits, _.-)")
        out += _strict("time", self.time, SLURM_TIME,
                       "must be a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        if self.container_image:
            out += _strict("container_image", self.container_image, CONTAINER_IMAGE,
                           "must be an image reference (registry/path:tag, @sha256:digest) or a .sqsh file")
        for i, mount in enumerate(self.mounts):
            out += _strict(f"mounts[{i}]", mount, CONTAINER_MOUNT,
                           "must look like SRC:DST[:FLAGS], paths of letters, digits and ._+-/ and an absolute DST")
        return out


def load_cluster(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """The validated ``ClusterConfig`` of a YAML file plus ``key=value`` overrides (the recipe loader's rules:
    unknown keys with a suggestion, bad values and problems naming the file or the command line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster file {str(path)!r} does not exist")
    layers = [(str(path), read_yaml(path, what="a cluster file")), (COMMAND_LINE, parse_overrides(overrides))]
    try:
        cluster, origins = merge_layers(ClusterConfig, layers, overrides)
    except OmegaConfBaseException as error:  # a ${...} interpolation that does not resolve (``$HOME ${PATH}``)
        given = dict(item.split("=", 1) for item in overrides).get(str(error.full_key))
        where = f"from {COMMAND_LINE}: {error.full_key}={given}" if given is not None else str(path)
        raise ValueError(f"{where}: bad value for {error.full_key!r}: {str(error).splitlines()[0]} (a ${{...}} "
                         "in a cluster file is an OmegaConf interpolation)") from None
    check_problems(cluster, origins, what=f"cluster file {path}")
    return cluster
