"""A real nemo-run LocalExecutor run (no dry-run). A full `mmupt train` of even the tiny demo recipe takes
minutes on 2 cores, so the task is `mmupt config show demo rollout.n=12`, built by the same `train_task`
helper with another subcommand; the test reads the task's log."""

import nemo_run as run

from mmupt_megatron.launch.cluster import load_cluster
from mmupt_megatron.launch.executors import build_executor, train_task


def test_local_executor_runs_mmupt_for_real(tmp_path):
    cluster_yaml = tmp_path / "ws.yaml"
    cluster_yaml.write_text("kind: local\ngpus_per_node: 1\nenv: {MMUPT_LAUNCH_TEST: '1'}\n")
    cluster = load_cluster(cluster_yaml)
    task = train_task(cluster=cluster, recipe="demo", overrides=["rollout.n=12"], command=("config", "show"))
    with run.Experiment("mmupt-local-test", base_dir=str(tmp_path / "exp"), log_level="WARN") as exp:
        exp.add(task, executor=build_executor(cluster), name="show")
        exp.run(sequential=True, detach=False, tail_logs=False)
    logs = list((tmp_path / "exp").rglob("stdout.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    from mmupt_megatron.config_loading import load_config

    recipe_value = load_config("demo").rollout.max_new_tokens
    assert "'n': 12" in text and f"max_new_tokens: {recipe_value}" in text  # the override and the recipe's own value
    assert list((tmp_path / "exp").rglob("SUCCESS"))
