"""Clear errors where there were none (issue 33): a damaged ``wandb.json`` or ``metrics.jsonl`` is named before a
resume loads its checkpoint (a cut-off last metrics line, what a kill leaves, is dropped with a warning); a full
disk during a checkpoint says "no space left on FOLDER" and removes that checkpoint's partial ``.tmp`` only;
``mmupt launch --dryrun`` (packager: git) works from a folder outside any git checkout; bad-row messages read as
one line; a ``save_to_disk`` folder without ``state.json`` and a corrupt parquet in a dataset repository are
named; ``mmupt synthesize`` checks prompt + new tokens against the model's context before vLLM starts."""

import errno
import json
import logging
import pickle
import re
import shutil
import subprocess

import pytest

from mmupt_megatron.cli import main
from mmupt_megatron.cli_errors import describe_failure
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.dataset import BadRowError, DatasetConfig, ImageQuestionDataset
from mmupt_megatron.data.synthetic import write_splits
from mmupt_megatron.trainer import checkpoint as ckpt
from mmupt_megatron.trainer.metrics_log import METRICS_FILE, WANDB_STATE_FILE, MetricsLog, check_resume_files
from tests.reliability.hostile import training_checkpoint
from tests.tiny_models import make_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("round3") / "model", seed=0)  # 2048 positions


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("round3_data"), num_train=3, num_test=2, seed=0)


def metrics_lines(steps):
    return "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in steps)


def resumable_run(out, *, metrics: str, wandb: str | None = None):
    """A run folder with metrics and one complete checkpoint (step 2), its wandb.json as given."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(metrics)
    folder = training_checkpoint(ckpt.checkpoints_root(out), 2)
    if wandb is not None:
        (folder / WANDB_STATE_FILE).write_text(wandb)
    return folder


def run_cfg(out, *extra, model_path="unused"):
    return load_config("demo", [f"model.path={model_path}", f"trainer.output_dir={out}", *extra])


# -- 1. a resume's side files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    ("[1]", r"expected an object with a \"run_id\" string, got \[1\]"),
    ('{"run_id": "abc', r"not valid JSON \(Unterminated string"),
    ('{"other": 1}\n', r"expected an object with a \"run_id\" string"),
])
def test_a_damaged_wandb_json_is_named_before_any_checkpoint_loads(tmp_path, content, problem):
    folder = resumable_run(tmp_path / "run", metrics=metrics_lines([0, 1, 2]), wandb=content)
    with pytest.raises(ValueError, match=rf"{folder / WANDB_STATE_FILE}: {problem}.*delete the file to log the "
                                         r"resumed run as a new W&B run"):
        check_resume_files(run_cfg(tmp_path / "run", "logging.wandb=true"))
    check_resume_files(run_cfg(tmp_path / "run"))  # W&B off: the file is never read, so it does not matter
    assert (folder / WANDB_STATE_FILE).read_text() == content  # reported, never rewritten


def test_a_damaged_metrics_line_in_the_middle_names_file_and_line(tmp_path):
    lines = metrics_lines([0, 1, 2]).splitlines(keepends=True)
    resumable_run(tmp_path / "run", metrics=lines[0] + '{"step": 1, "rew\n' + lines[2])
    with pytest.raises(ValueError, match=r"run/metrics.jsonl line 2: not a JSON line \(.*\); the metrics log is "
                                         "damaged: repair or delete that line to resume"):
        check_resume_files(run_cfg(tmp_path / "run"))
    (tmp_path / "run" / METRICS_FILE).write_text(lines[0] + "[3]\n" + lines[2])
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not a step's metrics \(a JSON object with an "
                                         r"integer \"step\"\), got '\[3\]'"):
        check_resume_files(run_cfg(tmp_path / "run"))


def test_a_cut_off_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    resumable_run(out, metrics=metrics_lines([0, 1, 2, 3]) + '{"step": 4, "reward": 0.2')  # killed mid-write
    check_resume_files(run_cfg(out))  # not an error
    with caplog.at_level(logging.WARNING, logger="mmupt_megatron.trainer.metrics_log"):
        log = MetricsLog(out, tensorboard=False, progress=False, total_steps=6, first_step=3)
    log.write({"step": 3, "reward": 0.75})
    log.close()
    assert (out / METRICS_FILE).read_text() == metrics_lines([0, 1, 2]) + json.dumps({"step": 3, "reward": 0.75}) + "\n"
    [record] = [r for r in caplog.records if r.name == "mmupt_megatron.trainer.metrics_log"]
    assert record.levelno == logging.WARNING
    assert f"{out / METRICS_FILE} line 5: cut off (25 bytes, no newline" in record.getMessage()


def test_the_trainer_checks_side_files_before_ray_starts(model, tmp_path):
    import ray

    from mmupt_megatron.trainer.loop import Trainer

    folder = resumable_run(tmp_path / "run", metrics=metrics_lines([0, 1, 2]), wandb="[1]")
    with pytest.raises(ValueError, match=rf"{folder / WANDB_STATE_FILE}: expected an object"):
        Trainer(run_cfg(tmp_path / "run", "logging.wandb=true", model_path=model))
    assert not ray.is_initialized()


# -- 2. a full disk during a checkpoint -----------------------------------------------------------------------
def _checkpoint_exception(*inner):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    failures = {}
    for rank, error in enumerate(inner):
        try:
            raise error
        except BaseException as raised:  # noqa: BLE001 - wrapped with its traceback, as torch does
            failures[rank] = _wrap_exception(raised)
    return CheckpointException("save", failures)


def _megatron_worker_failure():
    try:
        raise RuntimeError("Worker failure: [Errno 28] No space left on device") from OSError(errno.ENOSPC, "No space")
    except RuntimeError as error:
        return error


def _in_ray(cause):
    from ray.exceptions import RayTaskError

    return RayTaskError("PolicyWorker.save", "Traceback ...\nCheckpointException ranks:dict_keys([0])", cause)


FULL_DISK = {
    "oserror": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "torch dist-checkpoint": lambda: _checkpoint_exception(RuntimeError("shape ok"),
                                                           OSError(errno.ENOSPC, "No space left on device")),
    "megatron writer in dist-checkpoint": lambda: _checkpoint_exception(_megatron_worker_failure()),
    "zip writer short write, through Ray": lambda: _in_ray(_checkpoint_exception(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))),
}


class FailingCluster:
    """The workers' save: a partial policy file, then the error."""

    def __init__(self, error):
        self.error = error

    def save(self, folder):
        from pathlib import Path

        (Path(folder) / "policy").mkdir()
        (Path(folder) / "policy" / "__0_0.distcp").write_bytes(b"x" * 598)
        raise self.error


def trainer_saving_into(out, cluster):
    from mmupt_megatron.data.sampler import ResumableSampler
    from mmupt_megatron.trainer.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # only what _save uses: no model, data or Ray
    trainer.cfg, trainer.out_dir, trainer.cluster = run_cfg(out), out, cluster
    trainer.sampler = ResumableSampler(8, seed=0, shuffle=False)
    return trainer


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", FULL_DISK, ids=list(FULL_DISK))
def test_a_full_disk_says_so_and_removes_only_this_checkpoints_tmp(tmp_path, case):
    out = tmp_path / "run"
    root = ckpt.checkpoints_root(out)
    earlier = training_checkpoint(root, 1)
    before = _tree(earlier)
    other_tmp = root / "step_000002.tmp"  # left by an earlier killed run: not this save's
    other_tmp.mkdir()
    (other_tmp / "partial").write_text("kept")
    with pytest.raises(OSError, match=rf"no space left on {root}: checkpoint step_000003 could not be written \(the "
                                      r"partial step_000003.tmp was removed; .* free now; the complete checkpoints "
                                      "are untouched\\)") as raised:
        trainer_saving_into(out, FailingCluster(FULL_DISK[case]()))._save(3)
    assert raised.value.errno == errno.ENOSPC
    assert describe_failure(raised.value)[0].startswith(f"no space left on {root}: checkpoint step_000003")
    assert not (root / "step_000003.tmp").exists() and not (root / "step_000003").exists()
    assert _tree(earlier) == before and (other_tmp / "partial").read_text() == "kept"
    assert ckpt.load_latest("auto", out, ckpt.read_driver_state)[0] == earlier


def test_another_save_failure_passes_through_and_leaves_the_tmp(tmp_path):
    out = tmp_path / "run"
    error = _in_ray(_checkpoint_exception(RuntimeError("shape mismatch for 'decoder.layers.0'")))
    with pytest.raises(type(error), match="CheckpointException ranks") as raised:
        trainer_saving_into(out, FailingCluster(error))._save(3)
    assert raised.value is error
    assert (ckpt.checkpoints_root(out) / "step_000003.tmp" / "policy").is_dir()  # as before: resume ignores it


# -- 3. mmupt launch --dryrun outside a git checkout ----------------------------------------------------------
def git_cluster_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"kind: slurm\naccount: acct\nnodes: 1\ngpus_per_node: 0\npackager: git\n"
                    f"job_dir: {tmp_path}/jobs\n")
    return str(path)


def test_launch_dryrun_with_the_git_packager_works_from_outside_a_git_checkout(tmp_path, monkeypatch, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(outside)
    assert subprocess.run(["git", "rev-parse"], capture_output=True, check=False).returncode != 0  # really outside
    assert main(["launch", "demo", "--cluster", git_cluster_file(tmp_path), "--dryrun"]) == 0
    script = capsys.readouterr().out
    assert 'mmupt_megatron.cli train demo "trainer.ray_address=$ray_address"' in script
    assert "--chdir " in script and "/code" in script  # the job runs in the unpacked archive


def test_launch_with_the_git_packager_from_a_package_that_is_no_checkout_says_so(tmp_path, monkeypatch, capsys):
    from mmupt_megatron.launch import experiment

    installed = tmp_path / "site-packages"
    installed.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(experiment, "REPO_ROOT", installed)
    assert main(["launch", "demo", "--cluster", git_cluster_file(tmp_path), "--dryrun"]) == 2
    assert f"packager: git sends the code as a git archive of {installed}, which is not a git checkout" in \
        capsys.readouterr().err


# -- 4. data rows and dataset folders -------------------------------------------------------------------------
def test_a_bad_row_message_is_one_line_not_a_tuple(tmp_path, splits):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": \n')
    with pytest.raises(BadRowError) as raised:
        ImageQuestionDataset(bad)
    message = str(raised.value)
    assert message.startswith(f"{bad} row 0: invalid JSON: Expecting value") and "unparseable row" not in message
    assert str(pickle.loads(pickle.dumps(raised.value))) == message and raised.value.reason == "unparseable row"
    dataset = ImageQuestionDataset([splits["train"], bad], cfg=DatasetConfig(on_bad_row="skip"))
    assert dataset.skipped.summary() == f"skipped 1 rows (1 unparseable row); first: {message}"


def test_a_save_to_disk_folder_without_state_json_is_refused(tmp_path, splits):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_parquet(str(splits["train"]), cache_dir=str(tmp_path / "cache")).save_to_disk(str(saved))
    (saved / "state.json").unlink()
    with pytest.raises(ValueError, match=rf"^{saved}: a Dataset.save_to_disk folder \(dataset_info.json, 1 .arrow "
                                         r"file\(s\)\) without its state.json .*restore state.json"):
        ImageQuestionDataset(saved)


def test_a_corrupt_parquet_in_a_dataset_repository_is_named(tmp_path, splits, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(splits["train"], repo / "data" / "train-00000-of-00001.parquet")
    shutil.copy(splits["test"], repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("# tiny shapes\n")
    broken = repo / "data" / "test-00000-of-00001.parquet"
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{repo}: data file {broken}: not a readable parquet file \(ArrowInvalid: "
                                         "Parquet magic bytes not found"):
        ImageQuestionDataset(f"{repo}@train")


# -- 5. mmupt synthesize: the model's context, before vLLM ----------------------------------------------------
@pytest.fixture
def no_engine(monkeypatch):
    """Building a vLLM engine (or reading the seed rows) fails the test: the check must come first."""
    import mmupt_megatron.synthesis.cli as synthesis_cli
    from mmupt_megatron.engines import vllm_rollout

    def refuse(*args, **kwargs):
        raise AssertionError("reached past the context check")

    monkeypatch.setattr(vllm_rollout.VLLMRolloutEngine, "__init__", refuse)
    monkeypatch.setattr(synthesis_cli, "open_dataset", refuse)


@pytest.mark.parametrize("extra, keys", [
    ((), (r"synthesis.max_prompt_length=2048 \+ synthesis.max_new_tokens=256 = 2304 tokens is more than the model "
          r"serves: 2048 .*; rollout.max_prompt_length=2048 \+ rollout.max_new_tokens=2048 = 4096 tokens is more than "
          r"the model serves: 2048 \(config.json text_config.max_position_embeddings in .*model\); lower "
          r"rollout.max_new_tokens")),
    (("--recipe", "demo", "synthesis.max_new_tokens=512"),
     r"synthesis.max_prompt_length=2048 \+ synthesis.max_new_tokens=512 = 2560 tokens is more than the model serves"),
])
def test_synthesize_checks_the_context_before_the_engine_starts(model, splits, tmp_path, capsys, no_engine, extra, keys):
    out = tmp_path / "new.parquet"
    code = main(["synthesize", "--mode", "direct", "--input", str(splits["train"]), "--out", str(out),
                 "--model", str(model), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mmupt: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(keys, err), err
    assert not out.exists()
