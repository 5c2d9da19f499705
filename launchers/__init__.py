"""nemo-run launchers for mmupt-megatron: thin entry points over ``mmupt_megatron.launch``.

    python -m launchers.slurm qwen2_5_vl_7b_1n8g_tp2 --cluster configs/clusters/example_slurm.yaml --dryrun
    python -m launchers.local qwen2_5_vl_3b_1n8g_tp1 --cluster configs/clusters/workstation.yaml

The same as ``mmupt launch``; the library code (executors, Ray bootstrap, sweeps, planner) lives in
``mmupt_megatron/launch/`` so the installed ``mmupt`` command has it too.
"""

from mmupt_megatron.launch.cluster import ClusterConfig, load_cluster
from mmupt_megatron.launch.executors import build_executor, train_task

__all__ = ["ClusterConfig", "build_executor", "load_cluster", "train_task"]
