"""Two Slurm nodes on this one machine: `bash scripts/local_slurm.sh start --nodes 2` (each node a network
namespace with its own address on a bridge, its own hostname and its own /dev/shm; one slurmctld with
accounting in a third namespace; the filesystem shared).

The module starts its own 2-node Slurm in a state folder of its own (MMUPT_SLURM_DIR=/tmp/mmupt-2n-XXXX,
namespaces named after that folder), so it runs beside the single-node Slurm that scripts/test.sh keeps up:

- a 2-node sbatch job's srun sees two hostnames, two addresses in the cluster's subnet, and two private
  /dev/shm (a marker written on each node is seen only there); sacct reports it COMPLETED;
- a 2-node job brings up Ray with the shipped bootstrap (ray_bootstrap.py + wait_for_ray, head on node 0, a
  worker on node 1), ray.nodes() lists both node addresses and a task runs on each; nothing of Ray is left;
- `stop` leaves nothing: no daemon, namespace, link or mount of it (runs last).

Needs root, iproute2 and util-linux (unshare, nsenter); installs Slurm with apt-get the first time, as the
single-node Slurm does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmupt_megatron.config_loading import CONFIG_DIR

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

REPO = CONFIG_DIR.parent
SCRIPT = REPO / "scripts" / "local_slurm.sh"
CLUSTER_FILE = CONFIG_DIR / "clusters" / "local_slurm_2n.yaml"
SUBNET = ipaddress.ip_network("10.217.0.0/24")
PORT = "16917"  # its daemons live in their own namespaces, so any port would do; still not the 1-node one's


def run(cmd: list[str] | str, *, what: str, timeout: float, env: dict[str, str] | None = None,
        check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A bounded subprocess; a timeout or a failure names what it was for."""
    try:
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              shell=isinstance(cmd, str), check=False)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what}: no answer in {timeout:g} s\n{(error.stdout or b'')[-3000:]!r}\n{(error.stderr or b'')[-3000:]!r}")
    if check and done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode})\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def wait_until(what: str, seconds: float, probe):
    """probe() until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:g} s for {what}")
        time.sleep(0.5)


def host_view() -> SimpleNamespace:
    """What of the host a cluster could leave behind: namespaces, links, mounts."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return SimpleNamespace(
        netns={line.split()[0] for line in netns.splitlines() if line.strip()},
        links={line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if ":" in line},
        mounts=Path("/proc/mounts").read_text().splitlines(),
        run_netns_mounted=any(line.split()[1] == "/run/netns" for line in Path("/proc/mounts").read_text().splitlines()),
    )


def processes_in(netns_inodes: set[int]) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.stat(proc / "ns" / "net").st_ino in netns_inodes:
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{proc.name} {line[:150]}")
        except OSError:
            continue
    return out


def cmdlines_with(text: str) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in line:
                out.append(f"{proc.name} {line[:150]}")
    return out


@pytest.fixture(scope="module")
def cluster():
    # CI runs as root on machines that make namespaces: anything missing is a failure there, not a skip
    assert os.geteuid() == 0, "the 2-node Slurm makes network namespaces: run the multinode tests as root"
    for tool in ("ip", "unshare", "nsenter"):
        assert shutil.which(tool), f"the 2-node Slurm needs {tool}"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True, check=False)
    # (an unnamed namespace: gone when `true` ends)
    assert probe.returncode == 0, f"this machine does not let root make network namespaces: {probe.stderr.strip()}"
    state = Path(tempfile.mkdtemp(prefix="mmupt-2n-", dir="/tmp"))  # short: sockets live there
    env = {**os.environ, "MMUPT_SLURM_DIR": str(state), "MMUPT_SLURM_PORT": PORT,
           "MMUPT_SLURM_SUBNET": str(SUBNET.network_address).rsplit(".", 1)[0]}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "RAY_"))}
    before = host_view()
    stopped = False
    try:
        start = time.monotonic()
        started = run(["bash", str(SCRIPT), "start", "--nodes", "2"], env=env, timeout=900,
                      what="bash scripts/local_slurm.sh start --nodes 2 (apt-get install of Slurm the first time)")
        print(f"\n--- start --nodes 2: {time.monotonic() - start:.1f} s ---\n{started.stdout}")
        netns = re.findall(r"\(netns (\S+)\)", started.stdout)
        assert len(netns) == 3, started.stdout  # two nodes and the controller
        inodes = {os.stat(f"/run/netns/{name}").st_ino for name in netns}
        shell = run(["bash", str(SCRIPT), "env"], env=env, timeout=30, what="local_slurm.sh env").stdout
        path = re.search(r'export PATH="([^"]*)\$PATH"', shell).group(1)
        home = state / "home"  # the jobs' HOME (shared by the nodes, like a cluster's): a Ray token turns auth on
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(os.urandom(16).hex())
        jobs_env = {**env, "PATH": path + os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(REPO),
                    "SLURM_CONF": str(state / "etc" / "slurm.conf")}
        ids = re.search(r"netns mmupt(\d+)-ctl", started.stdout).group(1)

        def stop() -> subprocess.CompletedProcess:
            nonlocal stopped
            stopped = True
            return run(["bash", str(SCRIPT), "stop"], env=env, timeout=180, what="local_slurm.sh stop")

        yield SimpleNamespace(env=env, jobs_env=jobs_env, state=state, netns=netns, inodes=inodes, before=before,
                              shm_source=f"mmupt{ids}-shm", stop=stop)
    finally:
        if not stopped:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=180, check=False)
        shutil.rmtree(state, ignore_errors=True)


def sacct_state(cluster, job: str) -> str:
    out = run(["sacct", "-j", job, "-X", "-P", "-n", "-o", "State,ExitCode"], env=cluster.jobs_env, timeout=30,
              what=f"sacct -j {job}", check=False).stdout.strip()
    return out if out and not out.startswith(("PENDING", "RUNNING", "COMPLETING")) else ""


def submit(cluster, script: str, folder: Path, *, seconds: float) -> tuple[str, str]:
    """Submit a job script and wait (polling squeue: `sbatch --wait` sleeps up to 32 s between looks) until it
    has left the queue; (job id, its output). Fails, with the output, unless sacct says COMPLETED."""
    path = folder / "job.sh"
    path.write_text(script)
    done = run(["sbatch", "--parsable", str(path)], env=cluster.jobs_env, cwd=folder, timeout=30, what=f"sbatch {path}")
    job = done.stdout.strip().split(";")[0]
    out = folder / f"job-{job}.out"

    def finished() -> bool:
        queued = run(["squeue", "-h", "-j", job, "-o", "%T"], env=cluster.jobs_env, timeout=30, check=False,
                     what=f"squeue -j {job}")
        return (queued.returncode == 0 and not queued.stdout.strip()) or "Invalid job id" in queued.stderr

    try:
        wait_until(f"job {job} ({path}) to end", seconds, finished)
    except BaseException:
        run(["scancel", job], env=cluster.jobs_env, timeout=30, check=False, what=f"scancel {job}")
        print(out.read_text() if out.exists() else f"(no {out})")
        raise
    output = out.read_text() if out.exists() else ""
    state = wait_until(f"sacct to report job {job} finished", 30, lambda: sacct_state(cluster, job))
    assert state == "COMPLETED|0:0", f"job {job}: {state}\n{output[-5000:]}"
    return job, output


HEADER = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:03:00
#SBATCH --output=job-%j.out
set -euo pipefail
"""


def test_a_two_node_job_sees_two_hosts_addresses_and_private_shm(cluster, tmp_path):
    script = HEADER + r"""echo "batch on $(hostname)"
srun --nodes=2 --ntasks-per-node=1 bash -c 'echo "$(hostname) job $SLURM_JOB_ID" > "/dev/shm/mmupt-marker-$(hostname)"'
srun --nodes=2 --ntasks-per-node=1 bash -c '
    addrs=$(ip -4 -o addr show scope global | awk "{print \$4}" | paste -sd,)
    files=$(ls -A /dev/shm | paste -sd,)
    mine=$(cat "/dev/shm/mmupt-marker-$(hostname)")
    echo "NODE host=$(hostname) ip=$(hostname --ip-address) addrs=$addrs shm=$(stat -c %d:%i /dev/shm) files=$files mine=${mine// /_}"
'
srun --nodes=2 --ntasks-per-node=1 bash -c 'rm -f "/dev/shm/mmupt-marker-$(hostname)"'
"""
    start = time.monotonic()
    job, output = submit(cluster, script, tmp_path, seconds=120)
    seconds = time.monotonic() - start
    assert "batch on mmupt-n0" in output, output
    nodes = [dict(item.split("=", 1) for item in line.split()[1:]) for line in output.splitlines() if line.startswith("NODE ")]
    assert len(nodes) == 2, output
    hosts = {node["host"] for node in nodes}
    assert len(hosts) == 2 and os.uname().nodename not in hosts, output
    addresses = set()
    for node in nodes:
        (cidr,) = node["addrs"].split(",")  # exactly one global IPv4 address: its veth's
        address = ipaddress.ip_interface(cidr).ip
        assert address in SUBNET and not address.is_loopback, output
        assert node["ip"] == str(address), output  # its hostname resolves to it (the cluster's /etc/hosts)
        addresses.add(address)
        # its /dev/shm holds its own marker and nothing of the other node's
        assert node["files"].split(",") == [f"mmupt-marker-{node['host']}"], output
        assert node["mine"] == f"{node['host']}_job_{job}", output
    assert len(addresses) == 2, output
    shm = {node["shm"] for node in nodes}
    host_shm = os.stat("/dev/shm")
    assert len(shm) == 2 and f"{host_shm.st_dev}:{host_shm.st_ino}" not in shm, output  # two tmpfs, not the host's
    assert not list(Path("/dev/shm").glob("mmupt-marker-*"))  # nothing reached the host's /dev/shm
    print(f"\n--- job {job}: {seconds:.1f} s from sbatch to its end ---\n{output}")


def test_b_ray_over_two_nodes_with_the_shipped_bootstrap(cluster, tmp_path):
    from mmupt_megatron.launch.cluster import load_cluster
    from mmupt_megatron.launch.ray_bootstrap import RAY_TMP, ray_bootstrap_lines

    spec = load_cluster(CLUSTER_FILE, [f"python={sys.executable}"])
    boot = ray_bootstrap_lines(cluster=spec, container_flags=["--chdir", str(REPO)], log_dir=str(tmp_path))
    # Ray's session folder: the bootstrap's /tmp/ray-mmupt-JOBID on this shared /tmp, under a name the
    # single-node Slurm tests (which look for "/tmp/ray-mmupt-<their job id>" in command lines) cannot match
    ray_tmp = f"/tmp/ray-2n-{cluster.state.name.rsplit('-', 1)[-1]}-$SLURM_JOB_ID"
    assert RAY_TMP in boot
    boot = boot.replace(RAY_TMP, ray_tmp)
    check = """
import json, socket, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from mmupt_megatron.trainer.cluster import connect_ray
connect_ray(ray_address, log_to_driver=False, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=1)
def where():
    return socket.gethostname(), ray.util.get_node_ip_address()
ran = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
               for n in alive], timeout=60)
print("RAY " + json.dumps({"nodes": sorted([n["NodeManagerAddress"], n["NodeManagerHostname"]] for n in alive),
                           "ran": sorted(map(list, ran))}))
ray.shutdown()
""".replace("ray_address", "__import__('os').environ['RAY_ADDRESS_2N']")
    script = HEADER.replace("set -euo pipefail", "set -uo pipefail") + f"""
# as nemo-run's sbatch template does before its setup lines
nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )
head_node=${{nodes[0]}}
head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)
{boot}
RAY_ADDRESS_2N=$ray_address srun --nodes=1 --ntasks=1 -w "$head_node" --overlap --chdir {shlex.quote(str(REPO))} \\
    {shlex.quote(sys.executable)} -c {shlex.quote(check)} || exit 1
"""
    start = time.monotonic()
    try:
        job, output = submit(cluster, script, tmp_path, seconds=240)
    except BaseException:
        for session in Path("/tmp").glob(Path(ray_tmp).name.replace("$SLURM_JOB_ID", "*")):
            shutil.rmtree(session, ignore_errors=True)
        print("".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("ray-*.out"))))
        raise
    seconds = time.monotonic() - start
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("ray-*.out")))
    match = re.search(r"^RAY (.*)$", output, re.MULTILINE)
    assert match, output + logs
    result = json.loads(match.group(1))
    assert result["nodes"] == [["10.217.0.10", "mmupt-n0"], ["10.217.0.11", "mmupt-n1"]], output + logs
    assert result["ran"] == [["mmupt-n0", "10.217.0.10"], ["mmupt-n1", "10.217.0.11"]], output + logs
    assert "wait_for_ray: 2/2 nodes" in (tmp_path / f"ray-wait-{job}.out").read_text(), logs
    session = ray_tmp.replace("$SLURM_JOB_ID", job)
    try:
        # the job's end stopped both Ray nodes (the bootstrap's trap), nothing of its session is left running
        wait_until(f"the Ray processes of {session} to end", 60, lambda: not cmdlines_with(session))
    finally:
        shutil.rmtree(session, ignore_errors=True)
    print(f"\n--- Ray job {job}: {seconds:.1f} s from sbatch to its end ---\n{output}")


def test_z_stop_leaves_nothing_behind(cluster):
    pids = {p.stem: int(p.read_text()) for p in (cluster.state / "run").glob("*.pid") if p.read_text().strip()}
    assert len(pids) == 6, pids  # munged, mariadbd, slurmdbd, slurmctld, two slurmd
    assert processes_in(cluster.inodes)  # (the daemons run in the namespaces)
    start = time.monotonic()
    done = cluster.stop()
    seconds = time.monotonic() - start
    alive = [f"{name} ({pid})" for name, pid in pids.items() if Path(f"/proc/{pid}").exists()]
    assert alive == [], done.stdout
    assert processes_in(cluster.inodes) == [], done.stdout  # nothing left in a namespace it made
    assert cmdlines_with(str(cluster.state)) == []
    after = host_view()
    assert not set(cluster.netns) & after.netns, after.netns
    assert after.links <= cluster.before.links, after.links - cluster.before.links  # no link in the host's namespace
    made = [line for line in after.mounts
            if str(cluster.state) in line or cluster.shm_source in line or any(ns in line for ns in cluster.netns)]
    assert made == []
    if not cluster.before.run_netns_mounted and not after.netns:
        assert not after.run_netns_mounted, "the /run/netns mount `ip netns add` made is left"
    status = run(["bash", str(SCRIPT), "status"], env=cluster.env, timeout=30, check=False, what="local_slurm.sh status")
    assert status.returncode == 1 and "slurmd-mmupt-n0: stopped" in status.stdout, status.stdout
    again = cluster.stop()  # a second stop has nothing to do
    assert "stopped" not in again.stdout and "deleted" not in again.stdout, again.stdout
    print(f"\n--- stop: {seconds:.1f} s ---\n{done.stdout}")
