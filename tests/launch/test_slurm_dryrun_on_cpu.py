"""Slurm dry-runs through nemo-run 0.11.1: the rendered sbatch script brings up Ray (head, then one srun per
worker node, then a wait for every GPU) and runs `mmupt train` on the head with trainer.ray_address set."""

import re

import pytest

from mmupt_megatron.config_loading import CONFIG_DIR
from mmupt_megatron.launch.cluster import load_cluster
from mmupt_megatron.launch.experiment import launch, launch_sweep
from mmupt_megatron.launch.sweep import load_sweep

IMAGE = "nvcr.io/acme/mmupt:1.0"


def cluster_file(tmp_path, nodes):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"kind: slurm\naccount: acme_rl\npartition: batch\nnodes: {nodes}\ngpus_per_node: 8\ntime: '02:00:00'\n"
        f"container_image: {IMAGE}\nmounts: ['/lustre/ckpt:/checkpoints']\nenv: {{NCCL_DEBUG: WARN}}\n"
        f"job_dir: {tmp_path}/jobs\npackager: none\ntunnel: {{kind: local}}\n"
    )
    return load_cluster(path)


def positions(script, *needles):
    found = [script.find(n) for n in needles]
    assert all(i >= 0 for i in found), [n for n, i in zip(needles, found) if i < 0]
    return found


def test_four_nodes_head_then_workers_then_wait_then_train(tmp_path):
    script = launch(recipe="qwen2_5_vl_72b_4n8g_tp8pp4", cluster=cluster_file(tmp_path, 4),
                    overrides=["trainer.steps=5"], dryrun=True)
    for flag in ("--nodes=4", "--gpus-per-node=8", "--account=acme_rl", "--partition=batch", "--time=02:00:00"):
        assert f"#SBATCH {flag}" in script
    assert "export NCCL_DEBUG=WARN" in script
    head, wait_head, loop, worker, wait_all, train = positions(
        script, "ray.scripts.scripts start --head", "--nodes 1 --gpus 8 --timeout",
        "for ((i = 1; i < ${#ray_nodes[@]}; i++))", 'ray.scripts.scripts start --address="$ray_address"',
        "--nodes 4 --gpus 32 --timeout", "mmupt_megatron.cli train",
    )
    assert head < wait_head < loop < worker < wait_all < train
    srun_lines = [line for line in script.splitlines() if line.strip().startswith("srun ")]
    # the head, 2 waits, the worker srun (run once per other node by the loop), the training
    assert len(srun_lines) == 5, srun_lines
    for line in srun_lines:
        assert f"--container-image {IMAGE}" in line and "/lustre/ckpt:/checkpoints" in line and "--overlap" in line
    assert '-w "${ray_nodes[$i]}"' in script
    train_line = next(line for line in srun_lines if "mmupt_megatron.cli train" in line)
    assert "--nodes=1 --ntasks=1 --relative=0" in train_line
    assert re.search(r"train qwen2_5_vl_72b_4n8g_tp8pp4 trainer.steps=5 \"trainer.ray_address=\$ray_address\"$", train_line)
    assert "exit 1" in script.split("start --head")[1]  # an incomplete cluster stops the job
    assert "trap stop_ray EXIT" in script  # the Ray steps end with the job


def test_one_node_has_no_workers(tmp_path):
    script = launch(recipe="qwen2_5_vl_7b_1n8g_tp2", cluster=cluster_file(tmp_path, 1), dryrun=True)
    assert "#SBATCH --nodes=1" in script
    assert "python -m ray.scripts.scripts start --head" in script and "--gpus 8 --timeout" in script
    assert 'start --address=' not in script and "ray_nodes[$i]" not in script
    assert "train qwen2_5_vl_7b_1n8g_tp2" in script


def test_recipe_larger_than_the_cluster_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"parallel.tensor_parallel_size .* = 32 GPUs.* 1 x 8 = 8"):
        launch(recipe="qwen2_5_vl_72b_4n8g_tp8pp4", cluster=cluster_file(tmp_path, 1), dryrun=True)


def test_sweep_is_one_experiment_with_a_task_per_point(tmp_path):
    sweep = load_sweep(CONFIG_DIR / "sweeps" / "qwen2_5_vl_7b_lr_temperature.yaml")
    points = sweep.points()
    assert len(points) == 6
    assert len({p.name for p in points}) == 6
    text = launch_sweep(sweep=sweep, cluster=cluster_file(tmp_path, 1), dryrun=True)
    assert text.count("#!/bin/bash") == 6
    assert "trainer.lr=2.0e-06" in text and "rollout.temperature=1.0" in text
    assert text.count("trainer.output_dir=/checkpoints/runs/qwen2_5_vl_7b_1n8g_tp2/qwen7b-lr-temp-") == 6


def test_bad_sweep_point_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: qwen2_5_vl_7b_1n8g_tp2\ngrid:\n  rollout.temperature: [0.7, -1.0]\n")
    with pytest.raises(ValueError, match=r"(?s)bad.yaml: point bad-01-temperature-1 is invalid.*rollout.temperature must be > 0"):
        load_sweep(bad)
