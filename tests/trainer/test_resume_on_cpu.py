"""Kill-and-resume at DP=2: a run SIGKILLed mid-step resumes from its last complete checkpoint and reproduces
the uninterrupted run's metrics for the following steps, including the step after the first resumed update,
where lost optimizer state (Adam moments, fp32 main params of the distributed optimizer) would show."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.synthetic import write_splits
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_boxed_answers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
COMPARED = ("reward", "majority_share", "no_answer", "response_length", "train/loss", "train/grad_norm", "train/kl_ref")


def overrides(model, data, out):
    return [
        f"model.path={model}", f"data.train_files=[{data}]", f"trainer.output_dir={out}", "trainer.steps=4",
        "trainer.prompts_per_step=2", "trainer.prompts_per_update=2", "trainer.micro_batch_size=8", "rollout.n=4",
        "rollout.max_new_tokens=8", "trainer.lr=1e-4", "algorithm.loss.kl_coef=0.1", "trainer.num_cpus=2",
        "checkpoint.save_every=1", "checkpoint.keep_last=2", "checkpoint.export_hf=false", "logging.progress=true",
        # the engine on a bundle of its own, buckets through Ray's object store (the e2e test covers the
        # colocated engine and the shared-memory refit)
        "trainer.colocate=false", "rollout.refit_transport=ray",
        "parallel.data_parallel_size=2",  # Megatron's distributed optimizer: its state is sharded over DP
    ]


def run_in_process(args):
    import ray

    from mmupt_megatron.trainer.loop import Trainer

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        trainer = Trainer(load_config("demo", args))
        history = trainer.fit()
        assert ray.get(trainer.cluster.workers[0].refit_transport.remote()) == "ray"  # rollout.refit_transport=ray
        trainer.cluster.shutdown()
    finally:
        ray.shutdown()
    return history


def test_sigkill_mid_step_then_resume_reproduces_the_run(tmp_path):
    model = teach_boxed_answers(make_tiny_qwen2_5_vl(tmp_path / "model", seed=0))
    data = write_splits(tmp_path / "data", num_train=12, num_test=2, seed=0)["train"]
    reference = run_in_process(overrides(model, data, tmp_path / "straight"))
    assert [m["step"] for m in reference] == [0, 1, 2, 3]

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmupt_megatron.cli", "train", "demo", *overrides(model, data, killed)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    marker = killed / "checkpoints" / "step_000001" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)  # mid step 2: its checkpoint is never written
    proc.wait()
    assert not (killed / "checkpoints" / "step_000002" / "COMPLETE").exists()

    resumed = run_in_process(overrides(model, data, killed))
    assert [m["step"] for m in resumed] == [2, 3]
    for got, want in zip(resumed, reference[2:], strict=True):  # step 3 follows the first resumed update
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]
