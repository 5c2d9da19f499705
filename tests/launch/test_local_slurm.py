"""Real jobs on the single-node Slurm 22.05 of scripts/local_slurm.sh, submitted through `mmupt launch` as a
user would (a subprocess, the shipped configs/clusters/local_slurm.yaml). `.ci/run` starts that Slurm (with one
fake GPU); by hand: `bash scripts/local_slurm.sh start --gpus 1`.

- a 1-step demo training brings up the Ray head (with token authentication on, as Ray 2.60 turns it on when
  ~/.ray/auth_token exists), trains, writes metrics, stops the head and ends SUCCEEDED in nemo-run's status;
- a running training on the fake GPU is cancelled; nothing of its Ray is left;
- a job whose command fails reports FAILED with its log's last lines;
- a 2-node recipe renders, and the 1-node cluster refuses it naming the shortfall.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from mmupt_megatron.config_loading import CONFIG_DIR
from mmupt_megatron.data.synthetic import write_splits
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = CONFIG_DIR.parent
CLUSTER = CONFIG_DIR / "clusters" / "local_slurm.yaml"
SLURM_CONF = Path(os.environ.get("MMUPT_SLURM_DIR", "/tmp/mmupt-slurm")) / "etc" / "slurm.conf"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
TINY = ["trainer.steps=1", "trainer.prompts_per_step=2", "trainer.prompts_per_update=2", "trainer.micro_batch_size=4",
        "rollout.n=4", "rollout.max_new_tokens=8", "trainer.eval_k=2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    status = subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh"), "status"], capture_output=True, text=True, check=False)
    assert status.returncode == 0, f"the local Slurm is not running; start it: bash scripts/local_slurm.sh start --gpus 1\n{status.stdout}"
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)  # `ray start --head` then turns token auth on
    # the job decides Ray's settings as a user's would: from the token file, not from a RAY_* this process set
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(SLURM_CONF=str(SLURM_CONF), HOME=str(home), NEMORUN_HOME=str(home / "nemo_run"), PYTHONPATH=str(REPO))
    jobs = tmp_path_factory.mktemp("jobs")
    return SimpleNamespace(env=env, jobs=jobs, cluster=["--cluster", str(CLUSTER), "--cluster-set", f"job_dir={jobs}"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = make_tiny_qwen2_5_vl(folder / "model", seed=0)
    data = write_splits(folder / "data", num_train=8, num_test=2, seed=0)
    return [f"model.path={model}", f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['test']}]"]


def mmupt_launch(slurm, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmupt_megatron.cli", "launch", *args], cwd=REPO, env=slurm.env,
                          capture_output=True, text=True, check=False, timeout=timeout)


def submit(slurm, *args: str) -> str:
    done = mmupt_launch(slurm, *slurm.cluster, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return re.search(r"submitted experiment (\S+)", done.stdout).group(1)


def status(slurm, exp: str) -> tuple[str, str, str]:
    """(state, Slurm job id, the whole --status text) from `mmupt launch --status`."""
    done = mmupt_launch(slurm, "--status", exp, *slurm.cluster)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r": (\w+) \(job (\S+);", done.stdout)
    return match.group(1), match.group(2), done.stdout


def wait_for(slurm, exp: str, states: set[str], *, timeout: float) -> tuple[str, str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state, job, text = status(slurm, exp)
        if state in states or time.monotonic() > deadline:
            return state, job, text
        time.sleep(3)


def job_folder(slurm, exp: str) -> Path:
    (folder,) = [p for p in (slurm.jobs / "experiments").glob(f"*/{exp}/*") if p.is_dir()]
    return folder


def sacct(job: str) -> str:
    return subprocess.run(["sacct", "-j", job, "-X", "-P", "-n", "-o", "JobID,JobName,State,ExitCode,Elapsed,Submit,End"],
                          env={**os.environ, "SLURM_CONF": str(SLURM_CONF)}, capture_output=True, text=True, check=False).stdout.strip()


def ray_processes(job: str) -> list[str]:
    """Processes of the job's Ray (its session folder is /tmp/ray-mmupt-JOBID)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f"/tmp/ray-mmupt-{job}/" in line or line.rstrip().endswith(f"/tmp/ray-mmupt-{job}"):
            out.append(line[:200])
    return out


def gone(job: str, seconds: float = 60) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := ray_processes(job)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def test_demo_training_job_succeeds_on_slurm(slurm, tiny, tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    exp = submit(slurm, "demo", *tiny, f"trainer.output_dir={out}", *TINY)
    state, job, text = wait_for(slurm, exp, TERMINAL, timeout=1200)
    seconds = time.monotonic() - start
    folder = job_folder(slurm, exp)
    logs = mmupt_launch(slurm, "--logs", exp, *slurm.cluster).stdout
    assert state == "SUCCEEDED", text + logs[-5000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    head = (folder / f"ray-head-{job}.out").read_text()
    assert "Ray runtime started" in head, head[-3000:]
    assert "Ray token authentication: on" in logs  # the token in HOME: on for the head and any worker alike
    assert "wait_for_ray: 1/1 nodes" in (folder / f"ray-wait-{job}.out").read_text()
    assert "Ray cluster ready at" in logs and "trainer.ray_address=" in logs
    assert gone(job) == []  # the head step was stopped with the job
    line = sacct(job)
    assert "|COMPLETED|0:0|" in line, line
    script = next(folder.parent.glob("*_sbatch.sh")).read_text()
    print(f"\n--- sbatch script ---\n{script}\n--- sacct ---\n{line}\n--- submit to SUCCEEDED: {seconds:.0f} s ---")


def test_cancel_a_running_training_on_the_fake_gpu(slurm, tiny, tmp_path):
    exp = submit(slurm, "demo", *tiny, f"trainer.output_dir={tmp_path / 'run'}", *TINY[1:], "trainer.steps=50",
                 "--cluster-set", "gpus_per_node=1")
    state, job, text = wait_for(slurm, exp, {"RUNNING", *TERMINAL}, timeout=300)
    assert state == "RUNNING", text
    folder = job_folder(slurm, exp)
    deadline = time.monotonic() + 300
    while "Ray cluster ready" not in "".join(p.read_text() for p in folder.glob("sbatch_*.out")):
        assert time.monotonic() < deadline, "the Ray cluster did not come up"
        time.sleep(2)
    assert "1/1 nodes, 1/1 GPUs" in (folder / f"ray-wait-{job}.out").read_text()  # the fake GPU reached Ray
    assert ray_processes(job)
    done = mmupt_launch(slurm, "--cancel", exp, *slurm.cluster)
    assert done.returncode == 0 and "cancelled" in done.stdout, done.stdout + done.stderr
    state, _, text = wait_for(slurm, exp, TERMINAL, timeout=120)
    assert state == "CANCELLED", text
    assert "|CANCELLED" in sacct(job)
    assert gone(job) == []


def test_failing_command_reports_failed_with_the_log_tail(slurm):
    exp = submit(slurm, "--", "config", "show", "no_such_recipe")
    state, job, text = wait_for(slurm, exp, TERMINAL, timeout=300)
    assert state == "FAILED", text
    assert "last lines of" in text and "no_such_recipe" in text, text
    assert "|FAILED|2:0|" in sacct(job)


def test_two_node_recipe_renders_and_this_cluster_refuses_it(slurm):
    two_nodes = ["qwen2_5_vl_3b_2n8g_tp1", "--cluster-set", "nodes=2", "--cluster-set", "gpus_per_node=8"]
    done = mmupt_launch(slurm, *two_nodes, "--dryrun", *slurm.cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "#SBATCH --nodes=2" in done.stdout and "#SBATCH --gpus-per-node=8" in done.stdout
    assert 'start --address="$ray_address"' in done.stdout and "--nodes 2 --gpus 16" in done.stdout
    queued = subprocess.run(["squeue", "-h"], env=slurm.env, capture_output=True, text=True, check=False).stdout
    done = mmupt_launch(slurm, *two_nodes, *slurm.cluster)
    assert done.returncode == 2
    assert re.search(r"Slurm partition 'debug' cannot run this job: it has 1 node\(s\) \(\S+\) and the cluster file asks "
                     r"nodes=2: 1 node\(s\) short; its nodes have \d GPU\(s\) each and the cluster file asks "
                     r"gpus_per_node=8", done.stderr), done.stderr
    assert subprocess.run(["squeue", "-h"], env=slurm.env, capture_output=True, text=True, check=False).stdout == queued  # nothing submitted
