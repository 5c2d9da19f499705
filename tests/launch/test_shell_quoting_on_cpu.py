"""Hostile strings from a cluster file or the command line reach the job exactly, never as shell code.

The rendered sbatch script runs under bash with stand-ins for srun, scontrol and hostname that record their
argv and environment; each hostile value (spaces, ``$(...)``, backticks, ``;``, ``&&``, quotes, ``$VAR``) must
arrive verbatim in python / env / recipe path / overrides / command arguments / log folder / working folder,
and the canary file the injections would create must not exist. A ``job_dir`` nemo-run would write unquoted
is refused with a clear message."""

import json
import shutil
import subprocess
import textwrap

import pytest

from mmupt_megatron.config_loading import CONFIG_DIR
from mmupt_megatron.launch.cluster import ClusterConfig, load_cluster
from mmupt_megatron.launch.experiment import launch, launch_command
from mmupt_megatron.launch.ray_bootstrap import ray_bootstrap_lines

CANARY = "/tmp/mmupt-hostile-canary"
HOSTILE = [
    "with space",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"a; touch {CANARY}",
    f"a && touch {CANARY} || b",
    "it's",
    'say "hi" \\ there',
    "$HOME ${PATH} $1",
    f"line\nbreak; touch {CANARY}",
]

SRUN = textwrap.dedent("""\
    #!/usr/bin/env python3
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps({"argv": args, "env": os.environ.get("MMUPT_HOSTILE")}) + "\\n")
    if args[-1:] == ["--ip-address"]:
        print("127.0.0.1")
    import time
    if "ray.scripts.scripts" in args:  # `ray start --block` runs until the job script stops it
        time.sleep(60)
    if "mmupt_megatron.launch.wait_for_ray" in args:  # ready once the Ray steps have started
        started = "ray.scripts.scripts start --address" if args[args.index("--nodes") + 1] != "1" else "start --head"
        for _ in range(200):
            if started in open(os.environ["RECORD"]).read().replace('", "', " "):
                break
            time.sleep(0.05)
    """)


def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node0; echo node1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def run_script(script, tmp_path):
    """Run a rendered job script under bash with the stand-ins; the srun calls as (argv, env) records."""
    record = tmp_path / "record.jsonl"
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {"PATH": f"{fake_slurm(tmp_path)}:/usr/bin:/bin", "RECORD": str(record), "SLURM_JOB_NODELIST": "node0",
           "SLURM_JOB_ID": "7", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_canary():
    shutil.rmtree(CANARY, ignore_errors=True)
    yield
    import os

    assert not os.path.exists(CANARY), "a hostile string ran as shell code"


def slurm_cluster(tmp_path, **extra):
    return ClusterConfig(kind="slurm", account="acct", nodes=1, gpus_per_node=1, packager="none",
                         job_dir=str(tmp_path / "jobs"), **extra)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_train_job_gets_every_hostile_value_verbatim(tmp_path, value):
    recipe = tmp_path / f"my recipe {value.replace('/', '_')}.yaml"
    recipe.write_text((CONFIG_DIR / "demo.yaml").read_text())
    cluster = slurm_cluster(tmp_path, python=f"/opt/{value}/python", env={"MMUPT_HOSTILE": value})
    override = f"logging.run_name=a b; touch {CANARY} $(touch {CANARY})"  # overrides are YAML: a fixed hostile one
    script = launch(recipe=str(recipe), cluster=cluster, overrides=[override], dryrun=True)
    calls = run_script(script.split("\n", 1)[1], tmp_path)
    python = f"/opt/{value}/python"
    head, wait, train = [next(c for c in calls if module in c["argv"]) for module in
                         ("ray.scripts.scripts", "mmupt_megatron.launch.wait_for_ray", "mmupt_megatron.cli")]
    assert head["argv"][head["argv"].index(python):][:4] == [python, "-m", "ray.scripts.scripts", "start"]
    assert wait["argv"][wait["argv"].index(python) + 2] == "mmupt_megatron.launch.wait_for_ray"
    argv = train["argv"]
    assert argv[argv.index(python):] == [python, "-m", "mmupt_megatron.cli", "train", str(recipe.resolve()), override,
                                         "trainer.ray_address=127.0.0.1:6379"]
    assert all(c["env"] == value for c in (head, wait, train))  # the cluster file's env arrives as it was written


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_any_subcommand_gets_its_arguments_verbatim(tmp_path, value):
    cluster = slurm_cluster(tmp_path)
    command = ["eval", "--model", f"/ckpt/{value}", "--data", value]
    script = launch_command(command=command, cluster=cluster, dryrun=True)
    assert "ray.scripts.scripts" not in script  # only train runs on the job's Ray cluster
    (call,) = [c for c in run_script(script.split("\n", 1)[1], tmp_path) if c["argv"][-1] != "--ip-address"]
    assert call["argv"][-8:] == ["python", "-m", "mmupt_megatron.cli", *command]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_ray_bootstrap_quotes_log_and_working_folders(tmp_path, value):
    cluster = ClusterConfig(kind="slurm", account="a", nodes=2, gpus_per_node=2, python=f"py {value}")
    lines = ray_bootstrap_lines(cluster=cluster, container_flags=["--chdir", f"/work/{value}"], log_dir=f"/logs/{value}")
    script = f'head_node=node0\nhead_node_ip=127.0.0.1\nSLURM_JOB_NODELIST=node0\n{lines}\n'
    calls = run_script(script, tmp_path)
    outputs = sorted(arg for c in calls for arg in c["argv"] if arg.startswith("--output="))
    assert outputs == [f"--output=/logs/{value}/ray-head-%j.out", f"--output=/logs/{value}/ray-wait-%j.out",
                       f"--output=/logs/{value}/ray-wait-%j.out", f"--output=/logs/{value}/ray-worker-1-%j.out"]
    assert all(c["argv"][c["argv"].index("--chdir") + 1] == f"/work/{value}" for c in calls)
    assert all(f"py {value}" in c["argv"] for c in calls)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_job_dir_nemo_run_cannot_quote_is_refused(value):
    problems = ClusterConfig(kind="slurm", account="a", job_dir=f"/lustre/{value}").problems()
    assert problems == [(f"job_dir {'/lustre/' + value!r} may hold only letters, digits and ._+-/ (nemo-run 0.11.1 "
                         "writes it unquoted into the sbatch script and its srun lines)")]


def test_env_keys_must_be_shell_names(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps({"kind": "slurm", "account": "a", "env": {"A;touch x": "1", "OK_1": "2"}}))
    with pytest.raises(ValueError, match=r"env key 'A;touch x' must be a shell variable name"):
        load_cluster(path)


def test_job_dir_nemo_run_would_rewrite_is_refused():
    """nemo-run replaces '/nemo_run' (its in-container job folder) everywhere in a container-less sbatch script."""
    problems = ClusterConfig(kind="slurm", account="a", job_dir="runs/nemo_run").problems()
    assert problems and "holds '/nemo_run', which nemo-run 0.11.1 rewrites" in problems[0]
    assert not ClusterConfig(kind="slurm", account="a", job_dir="runs/nemo_run", container_image="img").problems()
