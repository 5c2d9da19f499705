"""Launch a recipe as a Slurm job (Ray head on the first node, workers on the rest, `mmupt train` on the head).

    python -m launchers.slurm qwen2_5_vl_7b_1n8g_tp2 --cluster configs/clusters/example_slurm.yaml --dryrun
    python -m launchers.slurm --sweep configs/sweeps/qwen2_5_vl_7b_lr_temperature.yaml --cluster CLUSTER.yaml

Equivalent to ``mmupt launch``; refuses a cluster file whose kind is not slurm.
"""

from __future__ import annotations

import sys

from mmupt_megatron.cli import main as mmupt_main
from mmupt_megatron.launch.cluster import load_cluster


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cluster" in argv and argv.index("--cluster") + 1 < len(argv):
        path = argv[argv.index("--cluster") + 1]
        if load_cluster(path).kind != "slurm":
            print(f"launchers.slurm: error: {path} has kind {load_cluster(path).kind!r}, not slurm", file=sys.stderr)
            return 2
    return mmupt_main(["launch", *argv])


if __name__ == "__main__":
    sys.exit(main())
