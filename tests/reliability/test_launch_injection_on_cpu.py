"""Issue 33: a cluster file cannot run shell code through the sbatch script nemo-run renders from it.

For every field of a cluster file and every hostile string (the launcher tests' set, issue 33's five and more:
``$(...)``, backticks, ``;``, ``|``, ``&``, quotes, newlines, carriage returns, ``#SBATCH`` directives, leading
dashes, ``${...}`` interpolations, look-alike Unicode) either ``load_cluster`` refuses the file with a
ValueError naming the file and the field (and the index of a list entry), or the value is inert: the sbatch
script of ``mmupt launch --dryrun`` is executed by bash with ``srun``, ``sbatch``, ``scontrol``, ... replaced by
stubs, runs to its end, creates no marker file and has the same ``#SBATCH`` directives as a benign one. The
``tunnel.*`` fields reach nemo-run's rsync / ssh command lines, which cannot run here, so every hostile one
must be refused.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/reliability/test_launch_injection_on_cpu.py
"""

import re
import subprocess
import textwrap

import pytest
import yaml

from mmupt_megatron.launch.cluster import load_cluster
from mmupt_megatron.launch.experiment import launch

# "MARKER" is replaced by the absolute path of the file an injection would create
HOSTILE = [
    # tests/launch/test_shell_quoting_on_cpu.py's
    "with space",
    "$(touch MARKER)",
    "`touch MARKER`",
    "a; touch MARKER",
    "a && touch MARKER || b",
    "it's",
    'say "hi" \\ there',
    "$HOME ${PATH} $1",
    "line\nbreak; touch MARKER",
    # issue 33's
    "acc$(touch MARKER)",
    "img;touch MARKER;#",
    "/lustre/a:/a;touch MARKER;#",
    "batch\ntouch MARKER #",
    "04:00:00\n#SBATCH --uid=0",
    # more of the same families
    "04:00:00\ntouch MARKER",
    "nvcr.io/a/b:1\n#SBATCH --uid=0",
    "/lustre/a:/a:ro\ntouch MARKER",
    "a|touch MARKER",
    "a&touch MARKER&",
    "a\ttouch MARKER",
    "a\rtouch MARKER",
    "a\\\ntouch MARKER",
    "#\ntouch MARKER",
    ">(touch MARKER)",
    "x'$(touch MARKER)'",
    '"$(touch MARKER)"',
    "\\$(touch MARKER)",
    "a'; touch MARKER; '",
    "$((1+1))",
    "${IFS}touch${IFS}MARKER",
    "-oProxyCommand=touch MARKER",
    "--uid=0",
    "~root/x",
    "*",
    "/lustre/*:/d",
    "a,b;touch MARKER",
    "/x:/y,/etc:/host-etc;touch MARKER;#",
    "a\u2028touch MARKER",
    "\x1b]0;touch MARKER\x07",
    "ｔｏｕｃｈ",
]

BASE = {
    "kind": "slurm", "account": "acct", "partition": "batch", "nodes": 2, "gpus_per_node": 0, "time": "01:00:00",
    "container_image": "nvcr.io/acme/mmupt:1.0", "mounts": ["/lustre/ckpt:/checkpoints"],
    "env": {"NCCL_DEBUG": "WARN"}, "packager": "none", "tunnel": {"kind": "local"},
}
"""A benign 2-node CPU cluster (job_dir is added per test): the Ray bootstrap has a worker srun and container
flags, so mounts and the image reach every srun line."""


def _ssh(**tunnel):
    return {"tunnel": {"kind": "ssh", "host": "login", "user": "me", **tunnel}}


# field -> (the cluster-file keys carrying the value, the name an error must hold)
FIELDS = {
    "kind": (lambda v: {"kind": v}, "kind"),
    "account": (lambda v: {"account": v}, "account"),
    "partition": (lambda v: {"partition": v}, "partition"),
    "time": (lambda v: {"time": v}, "time"),
    "container_image": (lambda v: {"container_image": v}, "container_image"),
    "mounts": (lambda v: {"mounts": ["/lustre/ckpt:/checkpoints", v]}, "mounts[1]"),
    "job_dir": (lambda v: {"job_dir": v}, "job_dir"),
    "packager": (lambda v: {"packager": v}, "packager"),
    "env_key": (lambda v: {"env": {v: "1"}}, "env key"),
    "nodes": (lambda v: {"nodes": v}, "nodes"),
    "gpus_per_node": (lambda v: {"gpus_per_node": v}, "gpus_per_node"),
    "cpus_per_node": (lambda v: {"cpus_per_node": v}, "cpus_per_node"),
    "ray_port": (lambda v: {"ray_port": v}, "ray_port"),
    "ray_wait_s": (lambda v: {"ray_wait_s": v}, "ray_wait_s"),
    "tunnel.kind": (lambda v: {"tunnel": {"kind": v}}, "tunnel.kind"),
    "tunnel.host": (lambda v: _ssh(host=v), "tunnel.host"),
    "tunnel.user": (lambda v: _ssh(user=v), "tunnel.user"),
    "tunnel.identity": (lambda v: _ssh(identity=v), "tunnel.identity"),
}

STUB = "#!/bin/sh\nexit 0\n"
STUBS = {
    # `ray start --block` runs until the job script's trap stops it; everything else succeeds at once
    "srun": '#!/bin/sh\ncase "$*" in *ray.scripts.scripts*) exec sleep 30;; esac\nexit 0\n',
    "scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node0\\nnode1\\n"\nexit 0\n',
    **{tool: STUB for tool in ("sbatch", "squeue", "scancel", "sinfo", "sacct", "salloc")},
}


def hostile(index, marker):
    return HOSTILE[index].replace("MARKER", str(marker))


def cluster_file(tmp_path, keys, name="cluster"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, "job_dir": str(tmp_path / "jobs"), **keys}, allow_unicode=True))
    return path


def sbatch_directives(script):
    """The options of the #SBATCH lines sbatch reads: those before the first line that is neither blank nor a
    comment (sbatch ignores any later one; a newline in a quoted value can only add one there)."""
    header = []
    for line in script.split("\n")[1:]:  # sbatch splits at \n only
        if line.strip() and not line.startswith("#"):
            break
        header.append(line)
    return sorted(re.findall(r"^#SBATCH\s+--?([A-Za-z-]+)", "\n".join(header), flags=re.MULTILINE))


def run_rendered(script, tmp_path):
    """Execute a rendered sbatch script with bash, Slurm's commands stubbed; its combined output."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool, text in STUBS.items():
        (stubs / tool).write_text(text)
        (stubs / tool).chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(script)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def render(cluster):
    """The one sbatch script of `mmupt launch demo --dryrun` (nemo-run's text, without the '### name' line)."""
    text = launch(recipe="demo", cluster=cluster, dryrun=True)
    assert text.count("#!/bin/bash") == 1, text[:500]
    return text.split("\n", 1)[1]


@pytest.fixture(scope="module")
def benign_directives(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("benign")
    directives = sbatch_directives(render(load_cluster(cluster_file(tmp_path, {}))))
    assert {"account", "partition", "time", "nodes"} <= set(directives)
    return directives


def loaded_or_refused(path, *names):
    """The cluster of a file, or None when it is refused with a message naming the file and one of ``names``."""
    try:
        return load_cluster(path)
    except ValueError as error:
        message = str(error)
        assert str(path) in message and any(name in message for name in names), message
        return None


def assert_inert(cluster, *, tmp_path, marker, benign_directives):
    """The rendered script runs to its end under bash, creates no marker and adds no #SBATCH directive."""
    script = render(cluster)
    output = run_rendered(script, tmp_path)
    assert "job exited with code 0" in output, output[-3000:]  # every line of the script ran
    assert not marker.exists(), "a cluster-file value ran as shell code"
    assert sbatch_directives(script) == benign_directives, "a cluster-file value added an #SBATCH directive"


@pytest.mark.parametrize("field", FIELDS)
def test_fields_nemo_run_writes_unquoted_refuse_hostile_values(tmp_path, field):
    """None of the hostile strings is a valid Slurm / pyxis / ssh value, a path nemo-run can write bare, an
    integer or a choice: each is refused with a message naming the file and the field (one test per field, the
    values in a loop: ~40 loads, each failure listed)."""
    keys, name = FIELDS[field]
    marker = tmp_path / "injected"
    wrong = []
    for index in range(len(HOSTILE)):
        path = cluster_file(tmp_path, keys(hostile(index, marker)), name=f"cluster-{index}")
        try:
            load_cluster(path)
            wrong.append((index, HOSTILE[index], "loaded"))
        except ValueError as error:
            if str(path) not in str(error) or name not in str(error):
                wrong.append((index, HOSTILE[index], str(error)))
    assert wrong == []
    assert not marker.exists()


def free_text_case(index, tmp_path, benign_directives):
    """The free-text values, ``python`` (nemo-run wants 'python' in it) and an ``env`` value, carrying one
    hostile string in one render: the job gets them as written (shell-quoted), so they are inert; refused only
    when they hold a ${...} interpolation OmegaConf cannot resolve."""
    marker = tmp_path / "injected"
    value = hostile(index, marker)
    keys = {"python": f"/opt/{value}/python", "env": {"NCCL_DEBUG": "WARN", "MMUPT_HOSTILE": value}}
    cluster = loaded_or_refused(cluster_file(tmp_path, keys), "'python'", "'env.MMUPT_HOSTILE'")
    assert (cluster is None) == ("${" in value)
    if cluster is not None:
        assert cluster.python == f"/opt/{value}/python" and cluster.env["MMUPT_HOSTILE"] == value
        assert_inert(cluster, tmp_path=tmp_path, marker=marker, benign_directives=benign_directives)


QUICK = [HOSTILE.index(v) for v in ("acc$(touch MARKER)", "line\nbreak; touch MARKER", "$HOME ${PATH} $1")]
"""Free-text cases run every time; the others (~40 renders and bash runs, ~15 s on 2 cores) are slow."""


@pytest.mark.parametrize("index", [i if i in QUICK else pytest.param(i, marks=pytest.mark.slow)
                                   for i in range(len(HOSTILE))])
def test_free_text_values_are_inert_in_the_executed_script(tmp_path, index, benign_directives):
    free_text_case(index, tmp_path, benign_directives)


@pytest.mark.parametrize("keys, message", [
    ({"account": "acc$(touch X)"}, r"account 'acc\$\(touch X\)' must be a Slurm account name"),
    ({"container_image": "img;touch X;#"}, r"container_image 'img;touch X;#' must be an image reference"),
    ({"mounts": ["/data:/data", "/a:/b;touch X"]}, r"mounts\[1\] '/a:/b;touch X' must look like SRC:DST\[:FLAGS\]"),
    ({"partition": "batch\nrm -rf DIR #"}, r"partition 'batch\\nrm -rf DIR #' must be a Slurm partition name"),
    ({"time": "04:00:00\n#SBATCH --uid=0"}, r"time '04:00:00\\n#SBATCH --uid=0' must be a Slurm time limit"),
    ({"tunnel": {"kind": "ssh", "host": "-oProxyCommand=touch X", "user": "me"}},
     r"tunnel.host '-oProxyCommand=touch X' must be a host name"),
])
def test_issue_33_values_are_refused_naming_the_file_and_field(tmp_path, keys, message):
    path = cluster_file(tmp_path, keys)
    with pytest.raises(ValueError, match=rf"(?s)invalid cluster file {re.escape(str(path))}:\n  - {message}.*nemo-run"):
        load_cluster(path)


def test_hostile_command_line_overrides_are_refused(tmp_path):
    path = cluster_file(tmp_path, {})
    with pytest.raises(ValueError, match=r"partition 'batch;touch X' must be a Slurm partition name"):
        load_cluster(path, ["partition=batch;touch X"])
    with pytest.raises(ValueError, match=r"from the command line: time=\$\{oops\}: bad value for 'time'"):
        load_cluster(path, ["time=${oops}"])


def test_realistic_values_load_render_and_run(tmp_path, benign_directives):
    digest = "nvcr.io/nvidia/pytorch:24.05-py3@sha256:" + "0123456789abcdef" * 4
    keys = {"account": "my-acct_1", "partition": "batch,gpu", "time": "1-04:00:00",
            "container_image": "nvcr.io/nvidia/pytorch:24.05-py3",
            "mounts": ["/lustre/data:/data:ro", "/lustre/ckpt:/checkpoints"],
            "tunnel": {"kind": "local"}}
    cluster = load_cluster(cluster_file(tmp_path, keys))
    script = render(cluster)
    for directive in ("--account=my-acct_1", "--partition=batch,gpu", "--time=1-04:00:00"):
        assert f"#SBATCH {directive}" in script
    assert sbatch_directives(script) == benign_directives
    srun_lines = [line for line in script.splitlines() if line.strip().startswith("srun ") and "--container" in line]
    assert len(srun_lines) == 5, srun_lines  # Ray head, 2 waits, the worker, the training
    assert all("--container-image nvcr.io/nvidia/pytorch:24.05-py3" in line and
               "--container-mounts /lustre/data:/data:ro,/lustre/ckpt:/checkpoints," in line for line in srun_lines)
    output = run_rendered(script, tmp_path)
    assert "job exited with code 0" in output and "Ray cluster ready" in output
    # the other accepted forms of a time, an image and an ssh tunnel
    for extra in ({"time": t} for t in ("30", "30:00", "04:00:00", "1-4", "1-04:00")):
        assert load_cluster(cluster_file(tmp_path, {**keys, **extra})).time == extra["time"]
    for image in (digest, "nvcr.io#nvidia/pytorch:24.05-py3", "/lustre/images/mmupt.sqsh", "ubuntu"):
        assert load_cluster(cluster_file(tmp_path, {**keys, "container_image": image})).container_image == image
    ssh = {"kind": "ssh", "host": "login-1.my-cluster.example.com", "user": "first.last",
           "identity": "~/.ssh/id_ed25519"}
    assert load_cluster(cluster_file(tmp_path, {**keys, "tunnel": ssh})).tunnel.identity == "~/.ssh/id_ed25519"


def test_the_checks_would_see_an_injection(tmp_path):
    """The checks have teeth: a script line that runs the marker command creates the marker under the stubs,
    and a directive a newline adds among the headers is one sbatch reads (a later one it ignores)."""
    headers = "#!/bin/bash\n#SBATCH --time='04:00:00\n#SBATCH --uid=0'\nset -e\n#SBATCH --later=1\n"
    assert sbatch_directives(headers) == ["time", "uid"]
    marker = tmp_path / "injected"
    script = textwrap.dedent(f"""\
        #SBATCH --partition='batch
        touch {marker} #'
        srun --nodes=1 true
        echo "job exited with code 0"
        """)
    run_rendered(script, tmp_path)
    assert marker.exists()


def test_a_cluster_made_in_code_is_checked_like_a_file():
    from mmupt_megatron.launch.cluster import ClusterConfig
    from mmupt_megatron.launch.executors import build_executor

    with pytest.raises(ValueError, match=r"^cluster: account 'acc\$\(touch X\)' must be a Slurm account name"):
        build_executor(ClusterConfig(account="acc$(touch X)"))
