"""Cluster files: typed, validated, errors name the file and the key; the shipped ones load."""

import pytest

from mmupt_megatron.config_loading import CONFIG_DIR
from mmupt_megatron.launch.cluster import load_cluster


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "clusters").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_cluster_files_load(path):
    cluster = load_cluster(path)
    assert cluster.num_gpus == cluster.nodes * cluster.gpus_per_node >= 0 and cluster.nodes >= 1


def test_overrides_and_problems_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kind: slurm\naccount: a\ntunnel: {kind: ssh, host: login}\nmounts: ['/no-colon']\n")
    with pytest.raises(ValueError) as info:
        load_cluster(path)
    assert "tunnel.user is required" in str(info.value) and "'/no-colon' must look like SRC:DST" in str(info.value)
    path.write_text("kind: slurm\naccount: a\n")
    assert load_cluster(path, ["nodes=4"]).num_gpus == 32
    with pytest.raises(ValueError, match=r"command line: unknown config key 'gpu_per_node' \(did you mean 'gpus_per_node'"):
        load_cluster(path, ["gpu_per_node=4"])
