"""Every numeric key is checked at load (before anything starts) and each problem names where its value came
from: the command line (with the key=value given) or the recipe file."""

import math

import pytest

from mmupt_megatron.config_loading import load_config

NEGATIVE = ["checkpoint.save_every=-1", "trainer.weight_decay=-0.1", "trainer.num_cpus=-2", "trainer.warmup_steps=-1",
            "trainer.eval_every=-5", "rollout.cpu_kvcache_gib=-1", "trainer.max_bad_steps=-1", "rollout.verify_refit_tol=-1e-3"]


@pytest.mark.parametrize("override", NEGATIVE)
def test_negative_counts_and_sizes_are_refused(override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"{key} must be a finite number >= 0, got .*\(from the command line: {key}={value}\)"):
        load_config("demo", [override])


@pytest.mark.parametrize("lr", ["0", "-1e-6", "nan", "inf"])
def test_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(ValueError, match=rf"trainer.lr must be finite and > 0, got .*\(from the command line: trainer.lr={lr}\)"):
        load_config("demo", [f"trainer.lr={lr}"])


@pytest.mark.parametrize("key", ["rollout.temperature", "reward.verify_timeout_s", "trainer.grad_clip", "algorithm.loss.clip_low"])
def test_no_float_key_accepts_nan(key):
    with pytest.raises(ValueError, match=rf"{key} must .*nan"):
        load_config("demo", [f"{key}=nan"])


@pytest.mark.parametrize("resume", ["true", "yes", "latest", "''"])
def test_resume_must_be_auto_never_or_a_folder(resume):
    with pytest.raises(ValueError, match="trainer.resume must be auto, never or a checkpoint folder"):
        load_config("demo", [f"trainer.resume={resume}"])


def test_recipe_values_are_named_as_the_recipes(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults: demo.yaml\ntrainer:\n  lr: -1.0\n")
    (tmp_path / "demo.yaml").write_text((__import__("mmupt_megatron.config_loading").config_loading.CONFIG_DIR / "demo.yaml").read_text())
    with pytest.raises(ValueError) as info:
        load_config(recipe, ["rollout.n=0"])
    message = str(info.value)
    assert f"trainer.lr must be finite and > 0, got -1.0 (from {recipe})" in message
    assert "rollout.n must be >= 1, got 0 (from the command line: rollout.n=0)" in message
    assert "invalid config from" not in message  # the old header blamed the recipe for everything


def test_a_command_line_type_error_says_so():
    with pytest.raises(ValueError, match=r"^from the command line: trainer.lr=fast: bad value for 'trainer.lr'"):
        load_config("demo", ["trainer.lr=fast"])


def test_valid_values_still_load():
    cfg = load_config("demo", ["trainer.lr=3e-4", "checkpoint.save_every=0", "rollout.verify_refit_tol=0"])
    assert math.isclose(cfg.trainer.lr, 3e-4) and cfg.checkpoint.save_every == 0


@pytest.mark.parametrize("cap", ["1.0", "0.5", "-3", "nan"])
def test_a_tis_cap_must_be_above_one(cap):
    with pytest.raises(ValueError, match=rf"algorithm.rollout_is_cap must be > 1 \(or null: off\), got .*"
                                         rf"\(from the command line: algorithm.rollout_is_cap={cap}\)"):
        load_config("demo", [f"algorithm.rollout_is_cap={cap}"])
    assert load_config("demo", ["algorithm.rollout_is_cap=2.0"]).algorithm.rollout_is_cap == 2.0
    assert load_config("demo").algorithm.rollout_is_cap is None  # off by default
