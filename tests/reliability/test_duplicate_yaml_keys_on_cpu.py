"""A recipe that gives a key twice (``steps: 5`` then ``steps: 7``, two ``trainer:`` sections) is refused, naming
the key, the file and both lines; plain YAML would keep the last silently. The parent named by ``defaults:`` and
cluster files are read the same way; a key repeated in different sections, or a YAML merge, is not a repeat."""

import pytest

from mmupt_megatron.config_loading import load_config, read_yaml


def write(path, text):
    path.write_text(text)
    return path


def test_a_key_given_twice_in_a_section_is_refused(tmp_path):
    recipe = write(tmp_path / "r.yaml", "defaults: demo\ntrainer:\n  steps: 5\n  lr: 1.0e-6\n  # later\n  steps: 7\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'r.yaml'}: key 'trainer.steps' is given twice, on line 3 "
                                         r"and on line 6 \(YAML would keep the last silently\): keep one$"):
        load_config(recipe)


def test_a_section_given_twice_is_refused(tmp_path):
    recipe = write(tmp_path / "r.yaml", "defaults: demo\ntrainer:\n  steps: 5\nrollout:\n  n: 4\ntrainer:\n  lr: 1.0e-6\n")
    with pytest.raises(ValueError, match=r"r.yaml: key 'trainer' is given twice, on line 2 and on line 6"):
        load_config(recipe)


def test_a_repeat_in_the_parent_recipe_names_the_parent(tmp_path):
    write(tmp_path / "parent.yaml", "rollout:\n  n: 4\n  n: 8\n")
    child = write(tmp_path / "child.yaml", "defaults: parent.yaml\ntrainer:\n  steps: 3\n")
    with pytest.raises(ValueError, match=r"parent.yaml: key 'rollout.n' is given twice, on line 2 and on line 3"):
        load_config(child)


def test_flow_mappings_and_lists_are_checked_too(tmp_path):
    cluster = write(tmp_path / "cluster.yaml", "nodes: [{name: a, gpus: 8, gpus: 4}]\n")
    with pytest.raises(ValueError, match=r"cluster.yaml: key 'nodes\[0\].gpus' is given twice, on line 1 and on line 1"):
        read_yaml(cluster, what="a cluster file")


def test_the_same_key_in_different_sections_and_merges_are_fine(tmp_path):
    recipe = write(tmp_path / "r.yaml", "defaults: demo\ntrainer:\n  seed: 3\nrollout:\n  seed: 4\n")
    cfg = load_config(recipe)
    assert (cfg.trainer.seed, cfg.rollout.seed) == (3, 4)
    merged = write(tmp_path / "m.yaml", "base: &b {n: 4, temperature: 0.5}\nrollout:\n  <<: *b\n  n: 6\n")
    assert read_yaml(merged)["rollout"] == {"n": 6, "temperature": 0.5}


def test_a_sweep_file_with_a_key_given_twice_is_refused(tmp_path):
    from mmupt_megatron.launch.sweep import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("recipe: demo\ngrid:\n  trainer.lr: [1e-5]\ngrid:\n  trainer.lr: [2e-5]\n")
    with pytest.raises(ValueError, match=r"sweep\.yaml: key 'grid' is given twice, on line 2 and on line 4"):
        load_sweep(sweep)
