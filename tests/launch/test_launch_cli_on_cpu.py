"""`mmupt launch` as its docstring shows it: options and overrides in any order, any mmupt subcommand as the job
(after `--`), CPU partitions (gpus_per_node 0), job files under the cluster's job_dir, and clear errors."""

import re

import pytest

from mmupt_megatron.cli import main


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"kind: slurm\naccount: acct\nnodes: 1\ngpus_per_node: 0\npackager: none\njob_dir: {tmp_path}/jobs\n")
    return str(path)


def test_recipe_options_and_overrides_in_the_documented_order(cluster, tmp_path, capsys):
    assert main(["launch", "demo", "--cluster", cluster, "--dryrun", "trainer.steps=3", "rollout.n=4"]) == 0
    script = capsys.readouterr().out
    assert "mmupt_megatron.cli train demo trainer.steps=3 rollout.n=4 \"trainer.ray_address=$ray_address\"" in script
    # a CPU partition: no GPU request, Ray waits for the node only
    assert "--gpus-per-node" not in script and "--num-gpus=0" in script and "--nodes 1 --gpus 0" in script
    # nemo-run writes the job files where sbatch will look for them: under the cluster's job_dir
    assert f"#SBATCH --output={tmp_path}/jobs/experiments/mmupt-demo/mmupt-demo_" in script


@pytest.mark.parametrize("command", [
    ["eval", "--model", "/ckpt/hf", "--data", "/data/test.parquet", "--k", "8"],
    ["synthesize", "--mode", "direct", "--input", "/d/in.parquet", "--out", "/d/out.parquet", "--model", "/m"],
    ["convert", "hf-to-megatron", "--hf", "/m", "--out", "/m-mcore", "--tp", "2", "--pp", "1"],
    ["train", "demo", "trainer.steps=2"],
])
def test_any_mmupt_subcommand_is_the_job(cluster, capsys, command):
    assert main(["launch", "--cluster", cluster, "--dryrun", "--", *command]) == 0
    script = capsys.readouterr().out
    line = next(line for line in script.splitlines() if "mmupt_megatron.cli" in line)
    if command[0] == "train":
        assert line.endswith("mmupt_megatron.cli train demo trainer.steps=2 \"trainer.ray_address=$ray_address\"")
        assert "ray.scripts.scripts start --head" in script
    else:
        assert line.endswith("mmupt_megatron.cli " + " ".join(command))
        assert "ray.scripts.scripts" not in script and "wait_for_ray" not in script


@pytest.mark.parametrize("argv, message", [
    (["launch", "demo", "--dryrun"], "mmupt launch needs --cluster CLUSTER.yaml"),
    (["launch", "--status", "mmupt-demo_123", "--cluster", "{cluster}"], r"no experiment 'mmupt-demo_123' under .*/jobs/experiments"),
    (["launch", "--status", "x_1", "--cancel", "x_1"], "one of --status/--logs/--cancel at a time"),
    (["launch", "demo", "--cluster", "{cluster}", "--", "eval"], r"give either RECIPE \[key=value \.\.\.\] or -- COMMAND"),
])
def test_wrong_usage_is_one_clear_message(cluster, capsys, argv, message):
    assert main([a.format(cluster=cluster) for a in argv]) == 2
    assert re.search(message, capsys.readouterr().err)


class FakeTunnel:
    """What `sinfo -h -N -o "%N|%P|%G"` prints on a cluster with a default GPU partition and a CPU one."""

    def run(self, command, **kwargs):
        from types import SimpleNamespace

        out = "g1|gpu*|gpu:h100:8(S:0-1)\ng2|gpu*|gpu:h100:4\nc1|cpu|(null)\nc2|cpu|(null)\nc3|cpu|(null)\n"
        return SimpleNamespace(return_code=0, stdout=out, stderr="")


@pytest.mark.parametrize("keys, shortfall", [
    ({"nodes": 2, "gpus_per_node": 4}, None),
    ({"nodes": 1, "gpus_per_node": 8}, None),  # the best node suffices
    ({"nodes": 2, "gpus_per_node": 8}, "partition 'gpu' cannot run this job: its nodes have 4 GPU(s) each and the cluster file asks gpus_per_node=8"),
    ({"nodes": 3, "gpus_per_node": 8}, "it has 2 node(s) (g1, g2) and the cluster file asks nodes=3: 1 node(s) short; its nodes have 4 GPU"),
    ({"nodes": 3, "gpus_per_node": 0, "partition": "cpu"}, None),
    ({"nodes": 4, "gpus_per_node": 1, "partition": "cpu"}, "partition 'cpu' cannot run this job: it has 3 node(s) (c1, c2, c3)"),
])
def test_capacity_check_names_the_shortfall(keys, shortfall):
    from mmupt_megatron.launch.cluster import ClusterConfig
    from mmupt_megatron.launch.experiment import check_capacity

    cluster = ClusterConfig(kind="slurm", account="a", **keys)
    if shortfall is None:
        check_capacity(cluster=cluster, tunnel=FakeTunnel())
    else:
        with pytest.raises(ValueError, match=re.escape(shortfall)):
            check_capacity(cluster=cluster, tunnel=FakeTunnel())
