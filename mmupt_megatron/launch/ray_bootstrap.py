"""The bash that brings up a Ray cluster inside a Slurm job: head on the first node, then one worker per
other node (an ``srun`` each), then a wait until every node's GPUs have joined.

It is handed to nemo-run's ``SlurmExecutor(setup_lines=...)``, so it runs in the sbatch script before the
training command (which nemo-run runs with ``srun --nodes=1 --ntasks=1 --relative=0 --overlap`` on the head
node). Each srun uses ``--overlap``: the Ray daemons keep running while later steps share the nodes.
nemo-run's own ``nodes_array`` holds only the first host (``nodes_array=($nodes)`` expands one element of
an array), so the node list is read again here.
"""

from __future__ import annotations

import shlex

from mmupt_megatron.launch.cluster import ClusterConfig

WAIT_MODULE = "mmupt_megatron.launch.wait_for_ray"


def _srun(*, node: str, output: str, container_flags: list[str]) -> str:
    flags = ["--nodes=1", "--ntasks=1", f'-w "{node}"', "--overlap", f"--output={output}"]
    return "srun " + " ".join(flags + [shlex.quote(f) for f in container_flags])


def ray_bootstrap_lines(*, cluster: ClusterConfig, container_flags: list[str], log_dir: str) -> str:
    """Bash lines that leave ``$ray_address`` pointing at a Ray cluster with all the job's GPUs."""
    py, gpn = cluster.python, cluster.gpus_per_node
    cpus = f" --num-cpus={cluster.cpus_per_node}" if cluster.cpus_per_node else ""
    common = f"--num-gpus={gpn}{cpus} --disable-usage-stats --block"

    def wait(gpus: int) -> str:
        srun = _srun(node="$head_node", output=f"{log_dir}/ray-wait-%j.out", container_flags=container_flags)
        return (
            f"{srun} {py} -m {WAIT_MODULE} --address \"$ray_address\" --gpus {gpus} --timeout {cluster.ray_wait_s} \\\n"
            f"    || {{ echo \"Ray cluster did not reach {gpus} GPUs in {cluster.ray_wait_s} s\"; "
            "kill \"${ray_pids[@]}\"; exit 1; }"
        )

    head = _srun(node="$head_node", output=f"{log_dir}/ray-head-%j.out", container_flags=container_flags)
    lines = [
        "# ---- Ray cluster (mmupt launch): head on the first node, a worker on each other node ----",
        'ray_nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )',
        f"ray_address=\"$head_node_ip:{cluster.ray_port}\"",
        "ray_pids=()",
        "# 1. Ray head on the first node",
        f"{head} \\\n    ray start --head --node-ip-address=\"$head_node_ip\" --port={cluster.ray_port} {common} &",
        "ray_pids+=($!)",
        wait(gpn),
    ]
    if cluster.nodes > 1:
        worker = _srun(node="${ray_nodes[$i]}", output=f"{log_dir}/ray-worker-$i-%j.out", container_flags=container_flags)
        lines += [
            f"# 2. Ray workers: one srun per other node ({cluster.nodes - 1})",
            "for ((i = 1; i < ${#ray_nodes[@]}; i++)); do",
            f"    {worker} \\\n        ray start --address=\"$ray_address\" {common} &",
            "    ray_pids+=($!)",
            "done",
            f"# 3. Wait until all {cluster.nodes} nodes' GPUs ({cluster.num_gpus}) have joined",
            wait(cluster.num_gpus),
        ]
    lines.append(f"echo \"Ray cluster ready at $ray_address with {cluster.num_gpus} GPUs\"")
    return "\n".join(lines)
