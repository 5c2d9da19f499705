"""The bash that brings up a Ray cluster inside a Slurm job: head on the first node, then one worker per
other node (an ``srun`` each), then a wait until every node (and its GPUs) has joined; the Ray steps are
stopped when the job script exits (a bash ``trap``), so the job does not linger in COMPLETING.

It is handed to nemo-run's ``SlurmExecutor(setup_lines=...)``, so it runs in the sbatch script before the
training command (which nemo-run runs with ``srun --nodes=1 --ntasks=1 --relative=0 --overlap`` on the head
node). Each srun uses ``--overlap``: the Ray daemons keep running while later steps share the nodes.
nemo-run's own ``nodes_array`` holds only the first host (``nodes_array=($nodes)`` expands one element of
an array), so the node list is read again here. Ray runs as ``PYTHON -m ray.scripts.scripts`` with the
cluster file's ``python`` (no ``ray`` on PATH needed), keeps its session files in its own temporary folder
(so a plain ``ray.init()`` elsewhere on the node never finds and joins it), and every value from the cluster
file is shell-quoted.
"""

from __future__ import annotations

import shlex

from mmupt_megatron.launch.cluster import ClusterConfig

WAIT_MODULE = "mmupt_megatron.launch.wait_for_ray"
RAY_CLI = "-m ray.scripts.scripts"
RAY_TMP = "/tmp/ray-mmupt-$SLURM_JOB_ID"
"""Ray's session folder in the job (short: Ray's socket paths must stay under 108 bytes)."""


def _srun(*, node: str, output: str, container_flags: list[str]) -> str:
    """``srun`` on one node; ``node`` and ``output`` are shell words already (they hold $variables)."""
    flags = ["--nodes=1", "--ntasks=1", f"-w {node}", "--overlap", f"--output={output}"]
    return "srun " + " ".join(flags + [shlex.quote(f) for f in container_flags])


def ray_bootstrap_lines(*, cluster: ClusterConfig, container_flags: list[str], log_dir: str) -> str:
    """Bash lines that leave ``$ray_address`` pointing at a Ray cluster with all the job's nodes and GPUs."""
    py, gpn, logs = shlex.quote(cluster.python), cluster.gpus_per_node, shlex.quote(log_dir)
    cpus = f" --num-cpus={cluster.cpus_per_node}" if cluster.cpus_per_node else ""
    common = f"--num-gpus={gpn}{cpus} --disable-usage-stats --block"

    def wait(nodes: int) -> str:
        """The waiter runs next to the Ray steps; whichever ends first decides (a dead head fails at once)."""
        srun = _srun(node='"$head_node"', output=f"{logs}/ray-wait-%j.out", container_flags=container_flags)
        want = f"{nodes} node(s)" + (f" with {nodes * gpn} GPUs" if gpn else "")
        return "\n".join([
            (f"{srun} {py} -m {WAIT_MODULE} --address \"$ray_address\" --nodes {nodes} --gpus {nodes * gpn} "
             f"--timeout {cluster.ray_wait_s} &"),
            "ray_wait=$!",
            'wait -n -p ray_done "$ray_wait" "${ray_pids[@]}"; ray_status=$?',
            'if [ "$ray_done" != "$ray_wait" ]; then',
            (f'    echo "a Ray step ended (exit $ray_status) before the cluster had {want}; its log, '
             f'ray-*-$SLURM_JOB_ID.out, is in" {logs}'),
            '    kill "$ray_wait" 2>/dev/null; exit 1',
            'fi',
            f'[ "$ray_status" = 0 ] || {{ echo "Ray cluster did not reach {want} in {cluster.ray_wait_s} s"; exit 1; }}',
        ])

    head = _srun(node='"$head_node"', output=f"{logs}/ray-head-%j.out", container_flags=container_flags)
    lines = [
        "# ---- Ray cluster (mmupt launch): head on the first node, a worker on each other node ----",
        'ray_nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )',
        f"ray_address=\"$head_node_ip:{cluster.ray_port}\"",
        "ray_pids=()",
        "# Ray 2.60: the head turns token authentication on when a token exists and RAY_AUTH_MODE is unset, a worker",
        "# joining with --address does not (it then fails with InvalidAuthToken): make the same choice for both",
        ('if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] '
         '|| [ -f "$HOME/.ray/auth_token" ]; }; then export RAY_AUTH_MODE=token; '
         'echo "Ray token authentication: on (a token exists; RAY_AUTH_MODE=token for the head and every worker)"; fi'),
        "# the Ray steps end with the job script (a SIGTERM stops `ray start --block` and its daemons)",
        'stop_ray() { ((${#ray_pids[@]})) || return 0; kill -TERM "${ray_pids[@]}" 2>/dev/null || true; wait "${ray_pids[@]}" 2>/dev/null || true; }',
        "trap stop_ray EXIT",
        "# 1. Ray head on the first node",
        (f"{head} \\\n    {py} {RAY_CLI} start --head --node-ip-address=\"$head_node_ip\" --port={cluster.ray_port} "
         f"--temp-dir=\"{RAY_TMP}\" --include-dashboard=false {common} &"),
        "ray_pids+=($!)",
        wait(1),
    ]
    if cluster.nodes > 1:
        worker = _srun(node='"${ray_nodes[$i]}"', output=f"{logs}/ray-worker-$i-%j.out", container_flags=container_flags)
        lines += [
            f"# 2. Ray workers: one srun per other node ({cluster.nodes - 1})",
            "for ((i = 1; i < ${#ray_nodes[@]}; i++)); do",
            f"    {worker} \\\n        {py} {RAY_CLI} start --address=\"$ray_address\" {common} &",
            "    ray_pids+=($!)",
            "done",
            f"# 3. Wait until all {cluster.nodes} nodes" + (f" ({cluster.num_gpus} GPUs)" if gpn else "") + " have joined",
            wait(cluster.nodes),
        ]
    lines.append(f"echo \"Ray cluster ready at $ray_address with {cluster.nodes} node(s), {cluster.num_gpus} GPUs\"")
    return "\n".join(lines)
