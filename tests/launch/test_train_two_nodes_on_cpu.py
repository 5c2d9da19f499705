"""Training runs across the two simulated Slurm nodes of `bash scripts/local_slurm.sh start --nodes 2` (each node
a network namespace with its own address, hostname and /dev/shm; the filesystem shared), submitted as a user
would: `mmupt launch demo --cluster configs/clusters/local_slurm_2n.yaml key=value...` (nemo-run's sbatch job:
Ray head on node 0, a worker on node 1, the trainer on the head). Tiny model, CPU, colocated engines: one policy
rank and one vLLM engine per node.

- (a) DP=2: each engine is refitted by the replica on its own node (shared memory), `rollout.verify_refit` passes
  on both engines; Ray, gloo and `_node_address` use the nodes' addresses, never loopback;
- (b) PP=2, a stage per node: each stage reaches its own node's engine by shared memory and the other node's by
  broadcast (a refit group at its own node's address), the stages taking turns; verify_refit passes (2 steps, a
  checkpoint after each: the straight run of (c));
- (c) the same run cancelled (scancel) once its step-0 checkpoint (both nodes' shards in the shared folder) is
  complete; a new job resumes it (`trainer.resume=auto`) and reproduces the straight run's step 1;
- (d) node 1 killed mid-run (every process in its network namespace: slurmd, the Ray worker, the actors): the job
  ends FAILED within a bounded time, its error names the lost node, nothing is left on node 0; the node rejoins.

A probe (PROBE below) wraps the job's `mmupt train`: the cluster file's `python` is a wrapper that runs
`-m mmupt_megatron.cli train ...` under it (anything else, e.g. `ray start`, as it is). It times every policy rank's
refit in the rank itself and, after `fit`, writes where every actor ran, what each process saw as its address,
its TCP connections, the refit sources, transports, waves and groups to OUTPUT/probe-JOBID.json.

The 2-node Slurm is the module-scoped `cluster` fixture of tests/launch/test_two_nodes_on_cpu.py (its own state
folder /tmp/mmupt-2n-XXXX and namespaces, started for this module and stopped at its end). Needs root.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmupt_megatron.config_loading import CONFIG_DIR
from mmupt_megatron.data.synthetic import write_splits
from mmupt_megatron.output_dirs import LOCK_FILE
from tests.launch.test_two_nodes_on_cpu import (  # noqa: F401 - cluster: the 2-node Slurm fixture, shared
    SCRIPT,
    cluster,
    cmdlines_with,
    processes_in,
    run,
    sacct_state,
    wait_until,
)
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_boxed_answers

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

REPO = CONFIG_DIR.parent
CLUSTER_FILE = CONFIG_DIR / "clusters" / "local_slurm_2n.yaml"
NODES = {"mmupt-n0": "10.217.0.10", "mmupt-n1": "10.217.0.11"}
JOB_SECONDS = 600  # one tiny training job: ~70-90 s on an idle 2-core machine
TINY = ["trainer.prompts_per_step=2", "trainer.prompts_per_update=2", "trainer.micro_batch_size=4", "rollout.n=4",
        "rollout.max_new_tokens=8", "checkpoint.export_hf=false", "logging.plots=false", "logging.tensorboard=false"]
PP2 = [*TINY, "trainer.steps=2", "parallel.pipeline_parallel_size=2", "rollout.verify_refit=true",
       "checkpoint.save_every=1", "checkpoint.keep_last=2"]
COMPARED = ("reward", "majority_share", "no_answer", "response_length", "train/loss", "train/pg_loss",
            "train/grad_norm", "train/kl_ref", "train/num_tokens")

PROBE = r'''"""`mmupt train` with a probe around it (tests/launch/test_train_two_nodes_on_cpu.py)."""
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import mmupt_megatron.trainer.cluster as cluster_module
import mmupt_megatron.trainer.loop as loop_module
from mmupt_megatron.cli import main


class TimedPolicyWorker(cluster_module.PolicyWorker):
    """The policy rank, its refits timed where they run (bytes, seconds)."""

    def refit(self, routes, **kwargs):
        start = time.perf_counter()
        sent = super().refit(routes, **kwargs)
        self.probe_refits = [*getattr(self, "probe_refits", []), [sent, time.perf_counter() - start]]
        return sent


def look(actor):
    """What an actor's process (and its children: vLLM's engine core) sees: host, address, TCP connections."""
    def inside(self):
        import os, socket, psutil, ray
        me = psutil.Process()
        tcp = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                tcp += [[c.laddr.ip, c.raddr.ip if c.raddr else "", c.status] for c in proc.net_connections(kind="tcp")]
            except psutil.Error:
                pass
        sender = getattr(self, "_sender", None)
        senders = getattr(sender, "senders", [sender]) if sender is not None else []
        return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "node": ray.get_runtime_context().get_node_id(), "master_addr": os.environ.get("MASTER_ADDR", ""),
                "tcp": tcp, "refits": getattr(self, "probe_refits", []),
                "groups": [s.name for s in senders if getattr(s, "name", "")]}
    return actor.__ray_call__.remote(inside)


def describe(cluster):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n["Alive"]]
    addresses = ray.get([ray.remote(cluster_module._node_address).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote() for n in alive])
    index = {e._actor_id: i for i, e in enumerate(cluster.engines)}
    return {
        "driver": {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address()},
        "nodes": {n["NodeID"]: [n["NodeManagerHostname"], n["NodeManagerAddress"]] for n in alive},
        "node_address": {n["NodeManagerHostname"]: list(a) for n, a in zip(alive, addresses)},
        "ranks": [dataclasses.asdict(info) for info in cluster.infos],
        "workers": ray.get([look(w) for w in cluster.workers]),
        "engines": ray.get([look(e) for e in cluster.engines]),
        "refit_sources": list(cluster.refit_sources),
        "refit_waves": [list(w) for w in cluster.refit_waves],
        "refit_transports": ray.get([w.refit_transport.remote() for w in cluster.workers]),
        "routes": [[[kind, [index[e._actor_id] for e in engines]] for kind, engines in routes]
                   for routes in cluster.refit_routes],
    }


def fit(self, _fit=loop_module.Trainer.fit):
    history = _fit(self)
    path = Path(self.cfg.trainer.output_dir) / f"probe-{os.environ.get('SLURM_JOB_ID', 'local')}.json"
    path.write_text(json.dumps(describe(self.cluster), default=str))
    return history


cluster_module.PolicyWorker = TimedPolicyWorker
loop_module.Trainer.fit = fit
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = teach_boxed_answers(make_tiny_qwen2_5_vl(folder / "model", seed=0))  # it answers in \boxed{}: rewards vary
    data = write_splits(folder / "data", num_train=8, num_test=2, seed=0)
    return [f"model.path={model}", f"data.train_files=[{data['train']}]"]


@pytest.fixture(scope="module")
def launcher(cluster, tmp_path_factory):  # noqa: F811 - the imported fixture
    """`mmupt launch` on the 2-node cluster: the shipped cluster file, a job folder of this module, the probe."""
    folder = tmp_path_factory.mktemp("launch")
    (folder / "probe.py").write_text(PROBE)
    wrapper = folder / "probe-python"
    wrapper.write_text(f"""#!/bin/sh
# the cluster file's python in these tests: `-m mmupt_megatron.cli train ...` under the probe, the rest as it is
if [ "$1" = "-m" ] && [ "$2" = "mmupt_megatron.cli" ] && [ "$3" = "train" ]; then
    shift 2
    exec {shlex.quote(sys.executable)} {shlex.quote(str(folder / 'probe.py'))} "$@"
fi
exec {shlex.quote(sys.executable)} "$@"
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    jobs = folder / "jobs"
    return SimpleNamespace(env=cluster.jobs_env, jobs=jobs, cluster=cluster, args=[
        "--cluster", str(CLUSTER_FILE), "--cluster-set", f"job_dir={jobs}", "--cluster-set", f"python={wrapper}"])


def mmupt_launch(launcher, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mmupt_megatron.cli", "launch", *args], env=launcher.env, cwd=REPO,
               timeout=300, what=f"mmupt launch {' '.join(args[:1])}")


def known_jobs(launcher) -> set[str]:
    done = run(["sacct", "-X", "-n", "-P", "-o", "JobID"], env=launcher.env, timeout=30, what="sacct", check=False)
    return set(done.stdout.split())


def submit(launcher, *overrides: str) -> SimpleNamespace:
    """`mmupt launch demo ...` -> (experiment id, Slurm job id, when it was submitted)."""
    before = known_jobs(launcher)
    start = time.monotonic()
    done = mmupt_launch(launcher, "demo", *launcher.args, *overrides)
    exp = re.search(r"submitted experiment (\S+)", done.stdout).group(1)
    (job,) = wait_until(f"job of {exp} in sacct", 30, lambda: known_jobs(launcher) - before)
    return SimpleNamespace(exp=exp, job=job, start=start)


def job_folder(launcher, sub: SimpleNamespace) -> Path:
    (folder,) = [p for p in (launcher.jobs / "experiments").glob(f"*/{sub.exp}/*") if p.is_dir()]
    return folder


def logs(launcher, sub: SimpleNamespace, *, tail: int = 6000) -> str:
    """The job's logs (nemo-run's sbatch output, the trainer's, the Ray steps'), the last ``tail`` characters of each."""
    folder = job_folder(launcher, sub)
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(folder.glob("*.out")))


def finished(launcher, sub: SimpleNamespace, *, seconds: float = JOB_SECONDS) -> str:
    """Wait until the job has left the queue; its sacct State|ExitCode."""
    def gone() -> bool:
        queued = run(["squeue", "-h", "-j", sub.job, "-o", "%T"], env=launcher.env, timeout=30, check=False,
                     what=f"squeue -j {sub.job}")
        return (queued.returncode == 0 and not queued.stdout.strip()) or "Invalid job id" in queued.stderr

    try:
        wait_until(f"job {sub.job} ({sub.exp}) to end", seconds, gone)
    except BaseException:
        run(["scancel", sub.job], env=launcher.env, timeout=30, check=False, what=f"scancel {sub.job}")
        print(logs(launcher, sub))
        raise
    return wait_until(f"sacct to report job {sub.job} finished", 30, lambda: sacct_state(launcher.cluster, sub.job))


def ray_left(job: str) -> list[str]:
    """Processes of the job's Ray (its session folder /tmp/ray-mmupt-JOBID: the bootstrap's RAY_TMP)."""
    return cmdlines_with(f"/tmp/ray-mmupt-{job}")


def no_ray_left(job: str) -> None:
    try:
        wait_until(f"the Ray processes of job {job} to end", 60, lambda: not ray_left(job))
    finally:
        shutil.rmtree(f"/tmp/ray-mmupt-{job}", ignore_errors=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def completed_run(launcher, out: Path, *overrides: str) -> SimpleNamespace:
    """A training job that must succeed: its submission, seconds to COMPLETED, sacct line, probe and metrics."""
    sub = submit(launcher, f"trainer.output_dir={out}", *overrides)
    state = finished(launcher, sub)
    seconds = time.monotonic() - sub.start
    assert state == "COMPLETED|0:0", f"job {sub.job}: {state}\n{logs(launcher, sub)}"
    no_ray_left(sub.job)
    elapsed = run(["sacct", "-j", sub.job, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Elapsed,NodeList"],
                  env=launcher.env, timeout=30, what="sacct").stdout.strip()
    probe = json.loads((out / f"probe-{sub.job}.json").read_text())
    return SimpleNamespace(**vars(sub), seconds=seconds, sacct=elapsed, probe=probe, metrics=metrics(out), out=out)


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address.removeprefix("::ffff:")).is_loopback


def check_addresses(probe: dict) -> None:
    """Ray's node addresses, `_node_address`, MASTER_ADDR (gloo) and every actor's TCP connections: the nodes'
    addresses, never loopback; each policy rank is connected to the other node (gloo across nodes)."""
    assert sorted(probe["nodes"].values()) == sorted([host, ip] for host, ip in NODES.items()), probe["nodes"]
    assert probe["driver"] == {"host": "mmupt-n0", "ip": NODES["mmupt-n0"]}, probe["driver"]
    assert {host: ip for host, (ip, _) in probe["node_address"].items()} == NODES, probe["node_address"]
    for actor in probe["workers"] + probe["engines"]:
        assert actor["ip"] == NODES[actor["host"]], actor
        on_loopback = [c for c in actor["tcp"] if c[2] == "ESTABLISHED" and (loopback(c[0]) or loopback(c[1]))]
        assert on_loopback == [], (actor["host"], on_loopback)
    for worker in probe["workers"]:
        assert worker["master_addr"] == NODES["mmupt-n0"], worker  # rank 0's node, from _node_address
        other = next(ip for host, ip in NODES.items() if host != worker["host"])
        assert any(c[1].removeprefix("::ffff:") == other and c[2] == "ESTABLISHED" for c in worker["tcp"]), worker


def refit_table(run_: SimpleNamespace) -> str:
    probe, rows = run_.probe, []
    for rank, worker in enumerate(probe["workers"]):
        for step, (sent, seconds) in enumerate(worker["refits"]):
            rows.append(f"  rank {rank} on {worker['host']} ({probe['refit_transports'][rank]}): refit {step} "
                        f"{sent / 2**20:.2f} MiB in {seconds * 1000:.0f} ms ({sent / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    rows += [f"  step {m['step']}: time/refit {m['time/refit'] * 1000:.0f} ms, time/verify_refit "
             f"{m.get('time/verify_refit', 0) * 1000:.0f} ms, train/refit_max_diff {m.get('train/refit_max_diff')}"
             for m in run_.metrics]
    return "\n".join(rows)


def test_a_dp2_each_engine_refits_from_the_replica_on_its_node(launcher, tiny, tmp_path):
    done = completed_run(launcher, tmp_path / "run", *tiny, *TINY, "trainer.steps=1", "parallel.data_parallel_size=2",
                         "rollout.verify_refit=true")
    probe = done.probe
    status = mmupt_launch(launcher, "--status", done.exp, *launcher.args).stdout
    assert re.search(rf": SUCCEEDED \(job {done.job};", status), status
    assert [m["step"] for m in done.metrics] == [0]
    assert done.metrics[0]["train/refit_max_diff"] < 1e-3  # rollout.verify_refit checked every engine (else it raises)
    check_addresses(probe)
    # one rank of each DP replica and one engine on each node
    workers = {w["host"]: r for r, w in enumerate(probe["workers"])}
    engines = {e["host"]: i for i, e in enumerate(probe["engines"])}
    assert sorted(workers) == sorted(engines) == sorted(NODES), probe
    assert sorted(info["dp_rank"] for info in probe["ranks"]) == [0, 1]
    # each engine takes its weights from the replica on its own node, by shared memory, both at once
    assert sorted(probe["refit_sources"]) == [0, 1], probe["refit_sources"]
    for host, engine in engines.items():
        replica = probe["refit_sources"][engine]
        assert probe["ranks"][workers[host]]["dp_rank"] == replica, (host, probe["refit_sources"], probe["ranks"])
    assert probe["refit_transports"] == ["shm", "shm"]
    assert probe["routes"] == [[["shm", [probe["refit_sources"].index(d)]]] for d in (0, 1)], probe["routes"]
    assert probe["refit_waves"] == [[0, 1]]
    sizes = {sent for w in probe["workers"] for sent, _ in w["refits"]}
    assert len(sizes) == 1 and sizes.pop() > 0  # each replica sends the whole model
    print(f"\n--- (a) DP=2 over 2 nodes: submit -> COMPLETED {done.seconds:.1f} s (sacct {done.sacct}); "
          f"refit_sources {probe['refit_sources']}\n{refit_table(done)}\n{status}")


@pytest.fixture(scope="module")
def straight_pp2(launcher, tiny, tmp_path_factory):
    """(b), the straight run of (c): PP=2, 2 steps, a checkpoint after each."""
    return completed_run(launcher, tmp_path_factory.mktemp("pp2") / "straight", *tiny, *PP2)


def test_b_pp2_stages_on_two_nodes_broadcast_to_the_other_node(straight_pp2):
    done = straight_pp2
    probe = done.probe
    assert [m["step"] for m in done.metrics] == [0, 1]
    assert all(m["train/refit_max_diff"] < 1e-3 for m in done.metrics)  # verify_refit on both engines, both steps
    check_addresses(probe)
    stages = {w["host"]: probe["ranks"][r]["pp_rank"] for r, w in enumerate(probe["workers"])}
    engines = [e["host"] for e in probe["engines"]]
    assert sorted(stages) == sorted(engines) == sorted(NODES), probe  # a stage and an engine on each node
    assert probe["refit_sources"] == [0, 0]  # DP=1: the one replica refits both engines
    for rank, worker in enumerate(probe["workers"]):
        routes = dict(probe["routes"][rank])
        assert set(routes) == {"shm", "broadcast"}, probe["routes"]
        # shared memory only within a node; the other node's engine by broadcast
        assert [engines[e] for e in routes["shm"]] == [worker["host"]], (worker["host"], routes, engines)
        assert [engines[e] for e in routes["broadcast"]] != [worker["host"]] and len(routes["broadcast"]) == 1
        # the refit group's rendezvous is at the sender's node address
        (group,) = worker["groups"]
        assert group.rsplit(":", 1)[0] == NODES[worker["host"]], worker["groups"]
    assert probe["refit_transports"] == ["shm+broadcast", "shm+broadcast"]
    assert probe["refit_waves"] == [[0], [1]]  # the two stages' groups share both engines: they take turns
    print(f"\n--- (b) PP=2 over 2 nodes: submit -> COMPLETED {done.seconds:.1f} s (sacct {done.sacct}); routes "
          f"{probe['routes']}, waves {probe['refit_waves']}, groups {[w['groups'] for w in probe['workers']]}\n"
          f"{refit_table(done)}")


def test_c_cancelled_at_a_checkpoint_then_resumed_reproduces_the_straight_run(launcher, tiny, straight_pp2, tmp_path):
    out = tmp_path / "run"
    sub = submit(launcher, f"trainer.output_dir={out}", *tiny, *PP2)
    first = out / "checkpoints" / "step_000000"

    def checkpointed() -> bool:
        if sacct_state(launcher.cluster, sub.job):  # ended before its checkpoint: fail with its logs
            pytest.fail(f"job {sub.job} ended before its step-0 checkpoint\n{logs(launcher, sub)}")
        return (first / "COMPLETE").exists()

    wait_until(f"job {sub.job}'s step-0 checkpoint", JOB_SECONDS, checkpointed)
    cancelled = time.monotonic()
    run(["scancel", sub.job], env=launcher.env, timeout=30, what=f"scancel {sub.job}")
    state = finished(launcher, sub, seconds=120)
    cancel_seconds = time.monotonic() - cancelled
    assert state.startswith("CANCELLED"), state
    no_ray_left(sub.job)
    lock = (out / LOCK_FILE).read_text().strip() if (out / LOCK_FILE).exists() else "none"  # the killed driver's
    # both nodes wrote their stage into the shared folder: rank 0 on mmupt-n0, rank 1 on mmupt-n1
    for part in ("policy/megatron", "optimizer"):
        writers = {p.name.split("_")[2] for p in (first / part).glob("__*_*.distcp")}
        assert writers == {"0", "1"}, (part, sorted(p.name for p in (first / part).iterdir()))
    raced = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != first.name)
    for name in raced:  # the cancel came after step 1 was saved too: resume from step 0 all the same
        shutil.rmtree(out / "checkpoints" / name)
    resumed = completed_run(launcher, out, *tiny, *PP2)  # trainer.resume=auto (the demo recipe's)
    text = logs(launcher, resumed, tail=10**7)
    assert f"resumed from {first} (step 0 done)" in text, text[-4000:]
    assert not (out / LOCK_FILE).exists()  # the resumed run took the folder over and released it
    assert [m["step"] for m in resumed.metrics] == [0, 1]
    assert resumed.metrics[1]["train/refit_max_diff"] < 1e-3
    got, want = resumed.metrics[1], straight_pp2.metrics[1]
    for key in COMPARED:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (key, got[key], want[key])
    exact = [key for key in COMPARED if got[key] == want[key]]
    print(f"\n--- (c) cancelled {cancel_seconds:.1f} s after its step-0 checkpoint was complete (scancel -> out of "
          f"the queue){'; it had saved step 1 too: ' + str(raced) + ' removed' if raced else ''}; resumed job "
          f"{resumed.job}: submit -> COMPLETED {resumed.seconds:.1f} s; lock left by the cancelled driver: {lock}; "
          f"taken over: {'taking over the lock' in text}\n  step 1 resumed vs straight: "
          + ", ".join(f"{k} {got[k]!r} / {want[k]!r}" for k in COMPARED) + f"\n  bit-identical: {exact}")


def node_processes(launcher, node: str) -> list[str]:
    """Processes in a node's network namespace, its slurmd left out."""
    ns = next(name for name in launcher.cluster.netns if name.endswith(f"-{node.rsplit('-', 1)[-1]}"))
    slurmd = (launcher.cluster.state / "run" / f"slurmd-{node}.pid").read_text().strip()
    return [p for p in processes_in({os.stat(f"/run/netns/{ns}").st_ino}) if p.split()[0] != slurmd]


def test_d_a_node_killed_mid_run_fails_the_job_naming_the_node(launcher, tiny, tmp_path):
    out = tmp_path / "run"
    sub = submit(launcher, f"trainer.output_dir={out}", *tiny, *TINY, "trainer.steps=200",
                 "parallel.data_parallel_size=2", "checkpoint.save_every=0")

    def training() -> bool:
        if sacct_state(launcher.cluster, sub.job):
            pytest.fail(f"job {sub.job} ended before it trained\n{logs(launcher, sub)}")
        return (out / "metrics.jsonl").exists() and bool((out / "metrics.jsonl").read_text().strip())

    wait_until(f"job {sub.job} to train a step", JOB_SECONDS, training)
    ns = next(name for name in launcher.cluster.netns if name.endswith("-n1"))
    listed = run(["ip", "netns", "pids", ns], timeout=30, what=f"ip netns pids {ns}").stdout.split()
    assert len(listed) > 3, listed  # slurmd, the Ray worker's step, raylet, the actors...
    killed = time.monotonic()
    for pid in listed:  # node 1 goes: its slurmd, the Ray worker and the actors on it, all at once
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(f"every process of {ns} to end", 30,
               lambda: not run(["ip", "netns", "pids", ns], timeout=30, what="ip netns pids").stdout.strip())

    def failed() -> str:
        out_ = run(["sacct", "-j", sub.job, "-X", "-P", "-n", "-o", "State,ExitCode"], env=launcher.env, timeout=30,
                   check=False, what="sacct").stdout.strip()
        return out_ if out_ and not out_.startswith(("PENDING", "RUNNING")) else ""

    state = wait_until(f"job {sub.job} to fail after node 1 was killed", 300, failed)
    to_failed = time.monotonic() - killed
    assert state == "FAILED|1:0", f"{state}\n{logs(launcher, sub)}"
    text = logs(launcher, sub, tail=10**7)
    (error,) = re.findall(r"mmupt: error: .*", text) or [f"no 'mmupt: error:' line in\n{text[-6000:]}"]
    assert re.search(r"lost Ray node mmupt-n1 \(10\.217\.0\.11, .*it ran policy rank 1, rollout engine 1\)", error), error
    # nothing of the job is left on the surviving node (its slurmd aside), nor of its Ray anywhere
    wait_until("nothing of the job left on mmupt-n0", 60, lambda: not node_processes(launcher, "mmupt-n0"))
    clean = time.monotonic() - killed
    no_ray_left(sub.job)
    status = mmupt_launch(launcher, "--status", sub.exp, *launcher.args).stdout
    assert re.search(rf": FAILED \(job {sub.job};", status), status
    assert error in status, status  # the cause: among the log's last lines, or above them when Ray's logs followed it
    nodes = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=launcher.env, timeout=30, what="sinfo").stdout
    # the node comes back (`start` is idempotent: it starts slurmd again), Slurm finishes the job's clean-up there
    # (else the job stays COMPLETING until SlurmdTimeout marks the node down) and both nodes are idle again
    rejoin = time.monotonic()
    run(["bash", str(SCRIPT), "start", "--nodes", "2"], env=launcher.cluster.env, timeout=120, what="local_slurm.sh start")
    finished(launcher, sub, seconds=120)
    rejoined = time.monotonic() - rejoin
    after = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=launcher.env, timeout=30, what="sinfo").stdout
    assert after.split() == ["mmupt-n0", "idle", "mmupt-n1", "idle"], after
    print(f"\n--- (d) node 1 killed ({len(listed)} processes): FAILED in sacct {to_failed:.1f} s later, nothing left on "
          f"mmupt-n0 {clean:.1f} s later; nodes then: {' '.join(nodes.split())}; node 1 back and the job out of the "
          f"queue {rejoined:.1f} s after `start`\n  {error}\n{status}")
