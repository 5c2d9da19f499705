import re
import subprocess
import sys

import pytest

from mmupt_megatron.config import Config
from mmupt_megatron.config_docs import describe_keys
from mmupt_megatron.config_loading import CONFIG_DIR, config_to_yaml, load_config


def write(path, text):
    path.write_text(text)
    return path


def test_overrides_and_one_level_of_defaults(tmp_path):
    write(tmp_path / "parent.yaml", "rollout:\n  n: 4\n  temperature: 0.5\ntrainer:\n  lr: 1.0e-5\n")
    child = write(tmp_path / "child.yaml", "defaults: parent.yaml\nrollout:\n  n: 6\n")
    cfg = load_config(child, ["trainer.lr=3e-4", "reward.min_agreement=0.4"])
    assert isinstance(cfg, Config)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.trainer.lr, cfg.reward.min_agreement) == (6, 0.5, 3e-4, 0.4)


def test_two_levels_of_defaults_are_refused(tmp_path):
    write(tmp_path / "a.yaml", "rollout:\n  n: 4\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    c = write(tmp_path / "c.yaml", "defaults: b.yaml\n")
    with pytest.raises(ValueError, match="one level deep"):
        load_config(c)


def test_unknown_key_suggests_the_right_one(tmp_path):
    recipe = write(tmp_path / "r.yaml", "rollout:\n  temprature: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown config key 'rollout.temprature' \(did you mean 'rollout.temperature'\?\)"):
        load_config(recipe)
    with pytest.raises(ValueError, match="did you mean 'algorithm.loss.kl_coef'"):
        load_config("demo", ["trainer.kl_coef=0.1"])
    with pytest.raises(ValueError, match="did you mean 'algorithm.loss.kl_coef'"):  # the key before the loss section
        load_config("demo", ["algorithm.kl_coef=0.1"])


def test_every_problem_is_named_at_once():
    with pytest.raises(ValueError, match="invalid config:") as info:
        load_config("demo", ["rollout.n=1", "trainer.lr=-1", "reward.min_agreement=2", "algorithm.loss.dual_clip=0.5",
                            "algorithm.loss.kl_coef=-1"])
    message = str(info.value)
    for key in ("rollout.n", "trainer.lr", "reward.min_agreement", "algorithm.loss.dual_clip", "algorithm.loss.kl_coef"):
        assert f"(from the command line: {key}=" in message  # each named with the value as typed


def test_type_errors_name_the_key():
    with pytest.raises(ValueError, match="bad value for 'rollout.temperature'"):
        load_config("demo", ["rollout.temperature=hot"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config("demo", ["rollout.n"])


def test_sequence_packing_takes_auto_or_a_boolean():
    assert load_config("demo").trainer.packing() is None  # auto: the policy packs where Transformer Engine runs
    assert load_config("demo", ["trainer.sequence_packing=true"]).trainer.packing() is True
    assert load_config("demo", ["trainer.sequence_packing=false"]).trainer.packing() is False
    with pytest.raises(ValueError, match=r"trainer.sequence_packing must be auto, true or false, got 'thd'"):
        load_config("demo", ["trainer.sequence_packing=thd"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="demo"):
        load_config("no-such-recipe")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_recipe_validates_and_matches_its_name(recipe):
    cfg = load_config(recipe)  # raises on any problem
    assert cfg.problems() == []
    # a scaling recipe's name is its topology: qwen2_5_vl_7b_2n8g_tp2 = 2 nodes x 8 GPUs, TP 2 (pp N when > 1)
    topology = re.search(r"_(\d+)n(\d+)g_tp(\d+)(?:pp(\d+))?$", recipe)
    if topology:
        nodes, gpus, tp, pp = (int(g) if g else 1 for g in topology.groups())
        assert cfg.parallel.world_size == nodes * gpus, recipe
        assert (cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size) == (tp, pp), recipe


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("demo", ["rollout.n=12"])
    again = load_config(write(tmp_path / "resolved.yaml", config_to_yaml(cfg)))
    assert again == cfg


def test_every_key_is_documented():
    rows = describe_keys()
    assert len(rows) > 40
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented


@pytest.mark.slow
def test_cli_prints_resolved_config_and_clean_errors():
    ok = subprocess.run(
        [sys.executable, "-m", "mmupt_megatron.cli", "config", "show", "demo", "rollout.n=9"],
        capture_output=True, text=True, check=False,
    )
    assert ok.returncode == 0 and "'n': 9" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mmupt_megatron.cli", "config", "show", "demo", "rollout.nn=9"],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 2 and "did you mean 'rollout.n'" in bad.stderr and "Traceback" not in bad.stderr


def test_num_engines_one_definition():
    cfg = load_config("demo", ["parallel.tensor_parallel_size=2", "parallel.data_parallel_size=4",
                               "rollout.tensor_parallel_size=2"])
    assert cfg.rollout.num_engines == 0
    assert cfg.rollout.engines(8, colocated=True) == 4
    assert cfg.rollout.engines(8, colocated=False) == 1
    assert cfg.num_engines() == (4 if cfg.trainer.colocate else 1)
    assert load_config("demo", ["rollout.num_engines=3", "trainer.colocate=false"]).num_engines() == 3
    # colocated engines cover the policy's devices exactly
    with pytest.raises(ValueError, match=r"rollout.num_engines=3 x rollout.tensor_parallel_size=1 devices != the policy's 1"):
        load_config("demo", ["rollout.num_engines=3"])
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size=3 does not divide the policy's 2 devices"):
        load_config("demo", ["parallel.tensor_parallel_size=2", "rollout.tensor_parallel_size=3"])
    with pytest.raises(ValueError, match=r"rollout.num_engines must be >= 0"):
        load_config("demo", ["rollout.num_engines=-1"])


def test_fp8_recipe_is_checked():
    assert load_config("demo", ["model.fp8_recipe=blockwise"]).model.fp8_recipe == "blockwise"
    with pytest.raises(ValueError, match=r"model.fp8_recipe must be one of delayed, tensorwise, blockwise, mxfp8"):
        load_config("demo", ["model.fp8_recipe=hybrid"])


def test_oversample_is_checked_and_sizes_the_sampled_prompts():
    assert load_config("demo", []).algorithm.drop_zero_advantage_groups is True  # on by default
    assert load_config("demo", ["rollout.oversample=1.5"]).rollout.prompts_to_sample(16) == 24
    assert load_config("demo", ["rollout.oversample=1.1"]).rollout.prompts_to_sample(10) == 11
    assert load_config("demo", []).rollout.prompts_to_sample(16) == 16
    for bad in ("0.5", "0", "-2", "nan", "inf"):
        with pytest.raises(ValueError, match=r"rollout.oversample must be a finite number >= 1 \(1 = no oversampling\)"):
            load_config("demo", [f"rollout.oversample={bad}"])
    with pytest.raises(ValueError, match="bad value for 'rollout.oversample'"):
        load_config("demo", ["rollout.oversample=twice"])
    with pytest.raises(ValueError, match="rollout.oversample=2.0 needs algorithm.drop_zero_advantage_groups=true"):
        load_config("demo", ["rollout.oversample=2", "algorithm.drop_zero_advantage_groups=false"])
    with pytest.raises(ValueError, match=r"algorithm.loss_over must be one of \('batch', 'trained'\), got 'groups'"):
        load_config("demo", ["algorithm.loss_over=groups"])
