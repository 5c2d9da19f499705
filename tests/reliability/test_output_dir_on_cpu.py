"""A used trainer.output_dir is continued, never overwritten: resume=never into it, resume=auto with nothing to
resume, an older or foreign checkpoint into it are all refused before Ray starts (naming trainer.output_dir and
trainer.resume); an unwritable folder, a missing model and a layout the model cannot split likewise. Pruning
never deletes a checkpoint newer than the one just written."""

import json

import pytest

from mmupt_megatron.config_loading import load_config
from tests.tiny_models import make_tiny_qwen2_5_vl
from mmupt_megatron.trainer import checkpoint as ckpt
from mmupt_megatron.trainer.preflight import check_before_start, remove_previous_run
from tests.reliability.hostile import training_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("preflight") / "model", seed=0)


def cfg(model, out, *extra):
    return load_config("demo", [f"model.path={model}", f"trainer.output_dir={out}", *extra])


def used_run(out, steps=(0, 1, 2)):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in steps))
    return (out / "metrics.jsonl").read_text()


def test_resume_never_into_a_used_folder_is_refused_before_ray(model, tmp_path):
    import ray

    from mmupt_megatron.trainer.loop import Trainer

    out = tmp_path / "run"
    history = used_run(out)
    with pytest.raises(ValueError, match=r"trainer.output_dir=.*run already holds a run \(metrics.jsonl\); "
                                         r"trainer.resume=never would overwrite its history"):
        Trainer(cfg(model, out, "trainer.resume=never", f"data.train_files=[{tmp_path / 'none.parquet'}]"))
    assert not ray.is_initialized()
    assert (out / "metrics.jsonl").read_text() == history


def test_resume_auto_without_a_checkpoint_does_not_restart_over_a_run(model, tmp_path):
    used_run(tmp_path / "run")
    with pytest.raises(ValueError, match="no complete checkpoint, so trainer.resume=auto cannot continue it"):
        check_before_start(cfg(model, tmp_path / "run"))


def test_resume_auto_continues_a_run_with_checkpoints(model, tmp_path):
    out = tmp_path / "run"
    used_run(out)
    training_checkpoint(ckpt.checkpoints_root(out), 2)
    check_before_start(cfg(model, out))  # no error


def test_an_older_checkpoint_of_the_same_run_is_not_resumed_over_its_later_steps(model, tmp_path):
    out = tmp_path / "run"
    used_run(out)
    older = training_checkpoint(ckpt.checkpoints_root(out), 1)
    training_checkpoint(ckpt.checkpoints_root(out), 2)
    with pytest.raises(ValueError, match=r"trainer.resume=.*step_000001 is older than step_000002 in trainer.output_dir"):
        check_before_start(cfg(model, out, f"trainer.resume={older}"))


def test_another_runs_checkpoint_is_not_resumed_into_a_used_folder(model, tmp_path):
    other = training_checkpoint(ckpt.checkpoints_root(tmp_path / "other"), 5)
    used_run(tmp_path / "run")
    with pytest.raises(ValueError, match="another run's checkpoint.* would mix the two"):
        check_before_start(cfg(model, tmp_path / "run", f"trainer.resume={other}"))
    check_before_start(cfg(model, tmp_path / "fresh", f"trainer.resume={other}"))  # into a new folder: fine


def test_resume_must_name_a_checkpoint(model, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.resume=.*nowhere: must be auto, never or a complete checkpoint folder"):
        check_before_start(cfg(model, tmp_path / "run", f"trainer.resume={tmp_path / 'nowhere'}"))


def test_unwritable_output_missing_model_and_bad_layout_are_named_together(model, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError) as info:
        check_before_start(cfg(tmp_path / "no_model", tmp_path / "a_file" / "run"))
    assert "model.path=" in str(info.value) and "no such folder" in str(info.value)
    assert "trainer.output_dir=" in str(info.value) and "is not writable: Not a directory" in str(info.value)
    with pytest.raises(ValueError, match=r"parallel.tensor_parallel_size=4 .* tp=4 does not divide num_attention_heads=2"):
        check_before_start(cfg(model, tmp_path / "run", "parallel.tensor_parallel_size=4"))
    with pytest.raises(ValueError, match="pp=3 does not divide num_hidden_layers=2"):
        check_before_start(cfg(model, tmp_path / "run", "parallel.pipeline_parallel_size=3"))
    with pytest.raises(ValueError, match="model.path=.*config.json"):
        check_before_start(cfg(tmp_path, tmp_path / "run"))  # a folder, but no model in it


def test_the_demo_replaces_only_its_own_runs(model, tmp_path):
    out = tmp_path / "run"
    check_before_start(cfg(model, out, "trainer.resume=never"))  # marks the folder as a run's
    used_run(out)
    remove_previous_run(out)
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="was not written by mmupt"):
        remove_previous_run(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_pruning_never_deletes_a_newer_checkpoint(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for step in (1, 2, 9):  # step 9: left by the run this one fell back from
        training_checkpoint(root, step)
    tmp = ckpt.begin(root, 3)
    ckpt.commit(tmp, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002", "step_000003", "step_000009"]
