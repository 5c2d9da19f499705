"""A damaged latest checkpoint does not stop a run that has an older complete one: trainer.resume=auto falls
back to the newest checkpoint that loads and says so. Damage: a truncated or missing data file, a truncated
index, a broken trainer_state.json, a load that fails in the workers."""

import pytest

from mmupt_megatron.trainer import checkpoint as ckpt
from tests.reliability.hostile import training_checkpoint


def truncate_data(folder):
    data = next((folder / "policy" / "megatron").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:10])


DAMAGES = {
    "truncated data file": truncate_data,
    "missing data file": lambda f: next((f / "optimizer").glob("*.distcp")).unlink(),
    "truncated index": lambda f: (f / "optimizer" / ".metadata").write_bytes((f / "optimizer" / ".metadata").read_bytes()[:20]),
    "broken trainer state": lambda f: (f / ckpt.STATE_FILE).write_text("{\"step\": "),
    "no policy metadata": lambda f: (f / "policy" / "mmupt_checkpoint.json").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_auto_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, damage):
    root = ckpt.checkpoints_root(tmp_path)
    training_checkpoint(root, 1)
    DAMAGES[damage](training_checkpoint(root, 2))
    logged = []
    folder, state = ckpt.load_latest("auto", tmp_path, ckpt.read_driver_state, log=logged.append)
    assert (folder.name, state["step"]) == ("step_000001", 1)
    assert len(logged) == 1 and "step_000002 does not load" in logged[0] and "falling back to an older one" in logged[0]


def test_a_load_that_fails_in_the_workers_falls_back_too(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    training_checkpoint(root, 1)
    training_checkpoint(root, 2)

    def load(folder):
        if folder.name == "step_000002":
            raise RuntimeError("CheckpointingException: shape mismatch for 'decoder.layers.0'")
        return ckpt.read_driver_state(folder)

    logged = []
    folder, _ = ckpt.load_latest("auto", tmp_path, load, log=logged.append)
    assert folder.name == "step_000001" and "shape mismatch" in logged[0]


def test_nothing_loads_is_an_error_naming_each_checkpoint(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    truncate_data(training_checkpoint(root, 1))
    truncate_data(training_checkpoint(root, 2))
    with pytest.raises(ValueError, match=r"no checkpoint in .* loads \(trainer.resume=auto\):\n  - step_000002: .*\n  - step_000001"):
        ckpt.load_latest("auto", tmp_path, ckpt.read_driver_state, log=lambda _: None)


def test_an_explicitly_named_damaged_checkpoint_is_an_error(tmp_path):
    folder = training_checkpoint(ckpt.checkpoints_root(tmp_path), 3)
    truncate_data(folder)
    with pytest.raises(ValueError, match=r"trainer.resume=.*step_000003: this checkpoint does not load: .* is damaged"):
        ckpt.load_latest(str(folder), tmp_path, ckpt.read_driver_state)


def test_no_checkpoint_starts_fresh(tmp_path):
    assert ckpt.load_latest("auto", tmp_path, ckpt.read_driver_state) is None
    assert ckpt.load_latest("never", tmp_path, ckpt.read_driver_state) is None
