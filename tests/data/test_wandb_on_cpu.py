"""Weights & Biases logging (``logging.wandb``), checked in offline mode (``WANDB_MODE=offline``): the offline run
folder under OUTPUT/wandb/ holds every metric of metrics.jsonl, the resolved config, the plots and the held-out
eval table; a run resumed from a checkpoint continues the same W&B run; two real trainer steps (Ray, Megatron,
vLLM) reach W&B, trained from a Hugging Face ``save_to_disk`` dataset."""

import json
import struct
import time
from pathlib import Path

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.trainer.metrics_log import WANDB_STATE_FILE, open_metrics_log, plot_metrics


def _chunks(path: Path):
    """The records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        else:
            return


def _records(path: Path, timeout_s: float = 60.0) -> list:
    """The parsed records of a finished run's log; wandb's service process writes the file behind ``finish()``,
    so wait (bounded) for the run's ``exit`` record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for chunk in _chunks(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(out_dir: Path) -> list[dict]:
    """Each offline run folder's id, run settings, config and history rows (by step), oldest first."""
    runs = []
    for folder in sorted((out_dir / "wandb").glob("offline-run-*")):
        run = {"folder": folder, "history": {}, "config": {}}
        for record in _records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, project=r.project, group=r.run_group, name=r.display_name, tags=list(r.tags))
                run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                row = {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in record.history.item}
                run["history"].setdefault(row["_step"], {}).update(row)
        runs.append(run)
    return runs


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the log's dir= wins: runs land in OUTPUT/wandb
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_metrics_config_plots_eval_table_and_resume_reach_wandb(offline, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config("demo", ["logging.wandb=true", "logging.run_name=first", "logging.wandb_tags=[a,b]",
                               "logging.tensorboard=false", "logging.progress=false", "trainer.steps=3"])
    assert cfg.logging.wandb_group == "demo"  # the recipe name
    steps = [{"step": 0, "reward": 0.25, "majority_share": 0.5, "eval/pass@1": 0.4, "eval/maj@k": 0.5},
             {"step": 1, "reward": 0.5, "majority_share": 0.75, "train/loss": -0.1}]
    log = open_metrics_log(cfg, out, first_step=0)
    for metrics in steps:
        log.write(metrics)
    log.add_plots(plot_metrics(log.path, out / "plots"))
    checkpoint = out / "checkpoints" / "step_000001"
    checkpoint.mkdir(parents=True)
    log.save_state(checkpoint)
    log.close()

    [run] = offline_runs(out)
    assert json.loads((checkpoint / WANDB_STATE_FILE).read_text()) == {"run_id": run["id"]}
    assert (run["project"], run["group"], run["name"], run["tags"]) == ("mmupt-megatron", "demo", "first", ["a", "b"])
    assert run["config"]["trainer"]["steps"] == 3 and run["config"]["logging"]["wandb"] is True
    for metrics in steps:  # every metric of metrics.jsonl, at its step
        logged = run["history"][metrics["step"]]
        assert {k: logged[k] for k in metrics if k != "step"} == {k: v for k, v in metrics.items() if k != "step"}
    plots = {k for row in run["history"].values() for k in row if k.startswith("plots/")}
    assert {"plots/reward/_type", "plots/majority_share/_type"} <= plots
    table_rows = [row for row in run["history"].values() if "eval/table/_type" in row]
    assert len(table_rows) == 1 and table_rows[0]["eval/table/nrows"] == 1
    table = json.loads((run["folder"] / "files" / table_rows[0]["eval/table/path"]).read_text())
    assert table["columns"] == ["step", "eval/maj@k", "eval/pass@1"] and table["data"] == [[0, 0.5, 0.4]]

    # resumed from that checkpoint: the same W&B run goes on at step 2
    resumed = open_metrics_log(cfg, out, first_step=2, resumed_from=checkpoint)
    resumed.write({"step": 2, "reward": 0.75})
    resumed.close()
    first, second = offline_runs(out)
    assert second["id"] == first["id"] and second["history"][2]["reward"] == 0.75
    # a fresh run (no checkpoint) is a new W&B run
    (tmp_path / "other").mkdir()
    open_metrics_log(cfg, tmp_path / "other", first_step=0).close()
    assert offline_runs(tmp_path / "other")[0]["id"] != first["id"]


def test_wandb_config_keys_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="logging.wandb_project must not be empty"):
        load_config("demo", ["logging.wandb=true", "logging.wandb_project=''"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"logging.wandb=true needs the 'wandb' package: pip install 'mmupt-megatron\[hub\]'"):
        load_config("demo", ["logging.wandb=true"])
    assert load_config("demo").logging.wandb is False  # off by default: wandb is never imported


@pytest.mark.distributed
@pytest.mark.slow
def test_two_trainer_steps_from_a_saved_dataset_reach_wandb(offline, tmp_path):
    import datasets
    import ray

    from mmupt_megatron.data.synthetic import write_splits
    from tests.tiny_models import make_tiny_qwen2_5_vl
    from mmupt_megatron.trainer.loop import Trainer

    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    files = write_splits(tmp_path / "data", num_train=6, num_test=2, seed=0)
    saved = tmp_path / "hf_data"
    datasets.DatasetDict({split: datasets.Dataset.from_parquet(str(files[split])) for split in ("train", "test")}) \
        .save_to_disk(str(saved))
    out = tmp_path / "run"
    cfg = load_config("demo", [
        f"model.path={model}", f"data.train_files=[{saved}]", f"data.eval_files=['{saved}@test']",
        f"trainer.output_dir={out}", "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.prompts_per_update=2",
        "trainer.micro_batch_size=8", "rollout.n=4", "rollout.max_new_tokens=8", "trainer.num_cpus=2",
        "trainer.eval_k=2", "checkpoint.save_every=1", "checkpoint.keep_last=1", "checkpoint.export_hf=false",
        "logging.progress=false", "logging.tensorboard=false", "logging.wandb=true",
    ])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        trainer = Trainer(cfg)
        assert trainer.dataset.files == [f"{saved}@train"] and len(trainer.held_out) == 2
        try:
            history = trainer.fit()
        finally:
            trainer.cluster.shutdown()
    finally:
        ray.shutdown()
    assert [m["step"] for m in history] == [0, 1]
    [run] = offline_runs(out)
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for metrics in jsonl:
        logged = run["history"][metrics["step"]]
        for key, value in metrics.items():
            if key != "step":
                assert logged[key] == pytest.approx(value), key
    assert "eval/pass@1" in run["history"][0] and "plots/reward/_type" in {k for r in run["history"].values() for k in r}
    assert run["config"]["data"]["train_files"] == [str(saved)] and run["group"] == "demo"
    assert json.loads((out / "checkpoints" / "step_000001" / WANDB_STATE_FILE).read_text()) == {"run_id": run["id"]}
