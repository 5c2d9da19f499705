"""Run a recipe on this workstation through nemo-run's LocalExecutor (the trainer starts its own Ray).

    python -m launchers.local qwen2_5_vl_3b_1n8g_tp1 --cluster configs/clusters/workstation.yaml
    python -m launchers.local demo --cluster configs/clusters/workstation.yaml --dryrun

Equivalent to ``mmupt launch`` with a ``kind: local`` cluster file (the default here).
"""

from __future__ import annotations

import sys

from mmupt_megatron.cli import main as mmupt_main

DEFAULT_CLUSTER = "configs/clusters/workstation.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cluster" not in argv:
        argv += ["--cluster", DEFAULT_CLUSTER]
    return mmupt_main(["launch", *argv])


if __name__ == "__main__":
    sys.exit(main())
