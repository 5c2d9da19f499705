"""A checkpoint written before the optimizer's first update resumes. With algorithm.drop_zero_advantage_groups
(the default) a run whose first steps are all unanimous skips their updates: its Adam has no moments, which
Megatron's sharded state asks for (the distributed optimizer could not even save; the plain one saved, then
every load asked for ``optimizer.state.exp_avg.*``), so trainer.resume=auto rejected every checkpoint. Such a
checkpoint now records that the optimizer had no state; loaded, the optimizer is fresh and its next updates are
those of an optimizer never saved (DP=1 plain, DP=2 distributed). And a whole run: two unanimous steps, then a
resume that trains."""

import json

import pytest

from mmupt_megatron.distributed.parallel import run_workers
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def unstepped_round_trip(hf_dir, data, folder, dp):
    """Save policy + optimizer before any update; load them into a fresh policy; two updates there and in a
    never-saved policy."""
    from mmupt_megatron.models.convert import load_megatron_checkpoint, save_megatron_checkpoint
    from mmupt_megatron.trainer.optim_checkpoint import load_optimizer, save_optimizer
    from tests.trainer.test_optimizer_checkpoint_on_cpu import _policy, _step, _weights

    saved = _policy(hf_dir, dp=dp)
    save_megatron_checkpoint(saved.model, f"{folder}/policy", hf_meta_dir=hf_dir)
    save_optimizer(saved, f"{folder}/optimizer")
    start = _weights(saved)
    resumed = _policy(hf_dir, dp=dp)
    load_megatron_checkpoint(resumed.model, f"{folder}/policy")
    load_optimizer(resumed, f"{folder}/optimizer")
    never_saved = _policy(hf_dir, dp=dp)
    for policy in (resumed, never_saved):
        _step(policy, data, 0.05)
        _step(policy, data, 0.02)
    try:  # into an optimizer that has stepped: refused, not silently mixed
        load_optimizer(resumed, f"{folder}/optimizer")
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"start": start, "resumed": _weights(resumed), "never_saved": _weights(never_saved), "refused": refused}


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("dp", [1, 2])
def test_an_optimizer_saved_before_its_first_update_loads_and_then_steps_like_a_fresh_one(tmp_path, dp):
    from tests.engines.test_megatron_policy_on_cpu import make_batch

    hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=3)
    data = make_batch(hf_dir, tmp_path)
    folder = tmp_path / "ckpt"
    result = run_workers(unstepped_round_trip, world_size=dp, args=(str(hf_dir), data, str(folder), dp))[0]
    kind = json.loads((folder / "optimizer" / "mmupt_optimizer.json").read_text())
    assert kind["state"] == "none" and kind["distributed"] == (dp > 1)
    assert not list((folder / "optimizer").glob("*.distcp"))  # no moments were written
    assert max_diff(result["resumed"], result["start"]) > 1e-4  # the updates moved the weights ...
    assert max_diff(result["resumed"], result["never_saved"]) < 1e-6  # ... as an optimizer never saved moves them
    assert "loads only into a fresh optimizer, not into one that has stepped" in result["refused"]


UNANIMOUS_STEPS = 2


def train(model_dir, data, out, steps, unanimous):
    """``Trainer.fit`` on the in-process cluster (checkpoints through the real policy worker): every response
    answers "2" (``unanimous``: no update), or half answer "2" and half "3"."""
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.loop import Trainer
    from tests.trainer.in_process_cluster import InProcessCluster

    class SavingCluster(InProcessCluster):  # as trainer.cluster.Cluster does it, with the optimizer state onloaded
        def save(self, folder):
            with self.schedule.around_checkpoint():
                self.worker.save(folder)

        def load(self, folder):
            with self.schedule.around_checkpoint():
                self.worker.load(folder)

    def script(index, sample):
        return f"so \\boxed{{{2 if unanimous or sample % 2 else 3}}}"

    cfg = load_config("demo", [
        f"model.path={model_dir}", f"data.train_files=[{data}]", f"trainer.output_dir={out}", f"trainer.steps={steps}",
        "trainer.prompts_per_step=2", "trainer.prompts_per_update=2", "trainer.micro_batch_size=8", "rollout.n=4",
        "rollout.max_new_tokens=8", "algorithm.loss.kl_coef=0", "rollout.verify_refit=false", "checkpoint.save_every=1",
        "checkpoint.keep_last=3", "checkpoint.export_hf=false", "logging.plots=false", "logging.tensorboard=false",
        "logging.progress=false",
    ])
    trainer = Trainer(cfg, cluster=SavingCluster(cfg, model_dir=model_dir, script=script))
    history = trainer.fit()
    return {"history": history, "resumed_from": str(trainer.resumed_from)}


def test_a_run_whose_steps_all_skipped_resumes_and_trains(tmp_path):
    from mmupt_megatron.data.synthetic import write_splits

    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    data = write_splits(tmp_path / "data", num_train=8, num_test=1, seed=0)["train"]
    out = tmp_path / "run"
    [first] = run_workers(train, world_size=1, args=(str(model), str(data), str(out), UNANIMOUS_STEPS, True))
    assert [m["train/no_signal_skip"] for m in first["history"]] == [1.0] * UNANIMOUS_STEPS  # no update at all
    assert not (out / ".mmupt.lock").exists()  # fit released the folder for the resume

    [resumed] = run_workers(train, world_size=1, args=(str(model), str(data), str(out), UNANIMOUS_STEPS + 1, False))
    assert resumed["resumed_from"] == str(out / "checkpoints" / "step_000001")
    [step] = resumed["history"]
    assert step["step"] == UNANIMOUS_STEPS and "train/no_signal_skip" not in step and step["groups/trained"] == 2.0
    assert step["train/grad_norm"] > 0
    before = json.loads((out / "checkpoints" / "step_000001" / "optimizer" / "mmupt_optimizer.json").read_text())
    assert before["state"] == "none"  # saved before any update: no moments
    kind = json.loads((out / "checkpoints" / f"step_{UNANIMOUS_STEPS:06d}" / "optimizer" / "mmupt_optimizer.json").read_text())
    assert "state" not in kind  # after the update: the moments are saved
