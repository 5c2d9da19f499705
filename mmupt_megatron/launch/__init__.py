"""Launching and planning runs: nemo-run executors (Slurm + Ray, local), sweeps, and the memory/FLOPs planner.

    mmupt launch RECIPE --cluster configs/clusters/example_slurm.yaml --dryrun [key=value ...]
    mmupt launch --cluster CLUSTER.yaml -- eval --model CKPT --data FILE     # any mmupt subcommand as the job
    mmupt launch --status|--logs|--cancel EXP_ID --cluster CLUSTER.yaml
    mmupt launch --sweep configs/sweeps/lr_temperature.yaml --cluster CLUSTER.yaml --dryrun
    mmupt plan RECIPE [--cluster CLUSTER.yaml]

nemo-run is imported lazily (it takes ~2.5 s), so ``mmupt plan`` and the rest of the CLI never pay for it.
"""
