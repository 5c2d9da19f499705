"""Checkpoints never run code: every file a resume or a conversion reads is either plain data loaded with
``weights_only=True`` or a dist-checkpoint index checked by a restricted unpickler first. Each crafted file
would run ``touch MARKER`` if unpickled freely; each is refused with a message naming the file, and the
marker never appears."""

import pytest
import torch

from mmupt_megatron.cli import main
from mmupt_megatron.models.convert import HF_SUBDIR, copy_hf_metadata
from mmupt_megatron.models.safe_files import check_dist_checkpoint, load_plain
from tests.tiny_models import make_tiny_qwen2_5_vl
from mmupt_megatron.trainer import checkpoint as ckpt
from tests.reliability.hostile import dist_checkpoint, evil_pickle, metadata_with, training_checkpoint


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "CODE_RAN"
    yield path
    assert not path.exists(), "a crafted pickle ran code"


def test_the_crafted_pickle_does_run_code_when_unpickled_freely(tmp_path):
    """The payload is live: loading it the old way (weights_only=False) runs the command."""
    path = evil_pickle(tmp_path / "rng.pt", tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: {"python": p, "torch": torch.zeros(3)}, lambda p: [1, {"x": p}]],
                         ids=["bare", "inside-rng-dict", "nested"])
def test_rng_state_file_that_runs_code_is_refused(tmp_path, marker, wrap):
    folder = training_checkpoint(tmp_path / "checkpoints", 4)
    evil_pickle(folder / "rng.pt", marker, wrap=wrap)
    with pytest.raises(ValueError, match=r"rng.pt: refused to load: it holds more than tensors and plain values"):
        ckpt.read_driver_state(folder)
    assert any("rng.pt: refused" in p for p in ckpt.checkpoint_problems(folder))


def test_resume_auto_passes_over_a_checkpoint_that_would_run_code(tmp_path, marker):
    root = tmp_path / "checkpoints"
    training_checkpoint(root, 1)
    evil_pickle(training_checkpoint(root, 2) / "rng.pt", marker)
    logged = []
    folder, state = ckpt.load_latest("auto", tmp_path, ckpt.read_driver_state, log=logged.append)
    assert (folder.name, state["step"]) == ("step_000001", 1)
    assert "step_000002 does not load" in logged[0] and "refused" in logged[0]


def test_old_per_rank_optimizer_pickles_are_never_loaded(tmp_path, marker):
    """The old format (optimizer/rank_00000.pt, unpickled freely) is not read: such a checkpoint does not load."""
    folder = training_checkpoint(tmp_path / "checkpoints", 3)
    for child in (folder / "optimizer").iterdir():
        child.unlink()
    evil_pickle(folder / "optimizer" / "rank_00000.pt", marker)
    assert any("optimizer is not a complete dist-checkpoint" in p for p in ckpt.checkpoint_problems(folder))


def test_dist_checkpoint_index_that_runs_code_is_refused(tmp_path, marker):
    folder = dist_checkpoint(tmp_path / "optimizer", {"exp_avg": torch.zeros(4)})
    evil_pickle(folder / ".metadata", marker, raw=True)
    with pytest.raises(ValueError, match=r"\.metadata: refused to load this checkpoint index \(refused to load posix.system\)"):
        check_dist_checkpoint(folder)


def test_pickled_object_inside_a_dist_checkpoint_that_runs_code_is_refused(tmp_path, marker):
    """Objects in a dist-checkpoint (megatron-core's ShardedObjects, e.g. ``_extra_state``) are unpickled by the
    loader with weights_only=False: each is checked with weights_only=True first."""
    from tests.reliability.hostile import RunsCode

    plain = dist_checkpoint(tmp_path / "plain", {"w": torch.zeros(2), "extra_state": {"format": 1, "scale": None}})
    check_dist_checkpoint(plain)  # plain objects pass
    folder = dist_checkpoint(tmp_path / "policy", {"w": torch.zeros(2), "extra_state": RunsCode(marker)})
    with pytest.raises(ValueError, match=r"refused to load the pickled object 'extra_state' in __0_0.distcp"):
        check_dist_checkpoint(folder)


def test_index_pointing_outside_the_checkpoint_is_refused(tmp_path):
    folder = dist_checkpoint(tmp_path / "optimizer", {"exp_avg": torch.zeros(4)})

    def escape(index):
        for info in index.storage_data.values():
            info.relative_path = "../../etc/passwd"

    metadata_with(folder, escape)
    with pytest.raises(ValueError, match=r"names a data file outside the checkpoint \(\.\./\.\./etc/passwd\)"):
        check_dist_checkpoint(folder)


def test_megatron_common_state_is_loaded_without_unpickling_code(tmp_path, marker):
    """megatron-core reads a dist-checkpoint's common.pt with torch.load's default, weights_only=True here."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    folder = dist_checkpoint(tmp_path / "optimizer", {"exp_avg": torch.zeros(4)})
    evil_pickle(folder / "common.pt", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_common_state_dict(folder)


def test_plain_loader_reads_what_we_write(tmp_path):
    torch.save({"python": (3, tuple(range(625)), None), "torch": torch.get_rng_state()}, tmp_path / "rng.pt")
    assert load_plain(tmp_path / "rng.pt")["python"][0] == 3


def test_convert_of_a_checkpoint_whose_index_runs_code_stops_with_one_line(tmp_path, marker, capsys):
    """`mmupt convert megatron-to-hf` on a crafted checkpoint: refused before any worker starts, no traceback."""
    from mmupt_megatron.models.convert import META_FILE

    ckpt_dir = tmp_path / "ckpt"
    dist_checkpoint(ckpt_dir / "megatron", {"weight": torch.zeros(2)})
    (ckpt_dir / HF_SUBDIR).mkdir()
    copy_hf_metadata(make_tiny_qwen2_5_vl(tmp_path / "model", seed=0), ckpt_dir / HF_SUBDIR)
    (ckpt_dir / META_FILE).write_text('{"tp": 1, "pp": 1, "dtype": "float32"}')
    evil_pickle(ckpt_dir / "megatron" / ".metadata", marker, raw=True)
    capsys.readouterr()
    assert main(["convert", "megatron-to-hf", "--ckpt", str(ckpt_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "refused to load posix.system" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
