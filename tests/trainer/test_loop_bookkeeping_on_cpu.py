"""``Trainer.step`` without Ray: an in-process cluster (a real world-1 Megatron policy, a scripted engine) so that
the vote, rewards, advantages, mini-batches and the order of the phases are known in advance and checked."""

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.synthetic import write_splits
from mmupt_megatron.distributed.parallel import run_workers
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = pytest.mark.distributed

# request 0: unanimous "2"; request 1: "2" x3, "3" x2, one response without an answer (6 voters, 4 trained)
ANSWERS = {0: ["2"] * 6, 1: ["2", "3", "2", "3", "2", None]}


def script(index: int, sample: int) -> str:
    answer = ANSWERS[index][sample]
    return "i am not sure" if answer is None else f"so \\boxed{{{answer}}}"


def one_step(model_dir: str, data: str, out: str, overrides: tuple[str, ...] = ()):
    from mmupt_megatron.trainer.loop import Trainer
    from tests.trainer.in_process_cluster import InProcessCluster

    cfg = load_config("demo", [
        f"model.path={model_dir}", f"data.train_files=[{data}]", f"trainer.output_dir={out}", "trainer.steps=1",
        "trainer.prompts_per_step=2", "trainer.prompts_per_update=1", "algorithm.ppo_epochs=2", "rollout.n=4",
        "rollout.n_vote=6", "rollout.max_new_tokens=8", "trainer.lr=1e-3", "algorithm.loss.kl_coef=0.1",
        "rollout.verify_refit=false", "trainer.micro_batch_size=2", "data.shuffle=false",
        "algorithm.drop_zero_advantage_groups=false",  # the unanimous group is trained on (with advantage 0)
        *overrides,
    ])
    cluster = InProcessCluster(cfg, model_dir=model_dir, script=script)
    metrics = Trainer(cfg, cluster=cluster).step(0)
    return metrics, cluster.calls, cluster.trained_advantages, cluster.schedule.log, cluster.moved_bytes


@pytest.mark.slow
def test_step_votes_rewards_and_trains_in_phase_order(tmp_path):
    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    data = write_splits(tmp_path / "data", num_train=4, num_test=1, seed=0)["train"]
    [(metrics, calls, advantages, phases, moved)] = run_workers(one_step, world_size=1,
                                                               args=(str(model), str(data), str(tmp_path / "run")))

    # 2 prompts x 6 voters generated; the engine sleeps before the policy works; old then reference log-probs of
    # the 8 trained responses; 2 epochs x 2 mini-batches of one prompt's 4 responses; the engine wakes its
    # weights, takes the refit, then wakes its KV cache
    assert calls == [("generate", 2, 6), ("engines_sleep",), ("logprobs", "policy", 8), ("logprobs", "reference", 8),
                     ("train", 4), ("train", 4), ("train", 4), ("train", 4), ("engines_wake", "weights"), ("refit",),
                     ("engines_wake", "kv_cache")]
    # the colocated memory schedule, in order; the policy's offloads are real (the reference at least)
    # the gradients and optimizer state come back only before the first update, not for the log-prob passes
    assert phases == ["before_first_rollout", "after_rollout", "reference_onload", "reference_offload",
                      "before_train", "before_refit", "after_refit"]
    assert len(moved) == 2 and moved[1] > moved[0] > 0  # after training, Adam's state leaves the device too
    # rewards: agreement with each group's majority ("2"), over all 12 voters: 6 + 3 agree
    assert metrics["reward"] == pytest.approx(9 / 12)
    assert metrics["majority_share"] == pytest.approx((1.0 + 3 / 6) / 2)  # no-answers count in the denominator
    assert metrics["no_answer"] == pytest.approx(1 / 12)
    # the unanimous group carries no signal; the other's trained responses are "2", "3", "2", "3"
    unanimous, split = advantages[0], advantages[1]
    assert unanimous == [0.0] * 4
    assert split[0] == split[2] > 0 > split[1] == split[3]
    assert advantages[2:] == advantages[:2]  # the second epoch trains on the same mini-batches
    assert metrics["train/num_tokens"] > 0 and metrics["train/grad_norm"] > 0 and "train/kl_ref" in metrics
    assert metrics["train/lr"] == pytest.approx(1e-3)  # trainer.lr_schedule=constant, no warm-up: logged per step


@pytest.mark.slow
def test_an_on_policy_step_runs_no_old_logprob_pass(tmp_path):
    """One epoch of one mini-batch: the reference pass (KL) still runs, the old-log-prob pass does not; the engine
    gap comes from the training forward and TIS weights reach the loss (the scripted engine's log-probs are 0, so
    every weight is the policy's probability of its token: below 1, never capped)."""
    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    data = write_splits(tmp_path / "data", num_train=4, num_test=1, seed=0)["train"]
    overrides = ("trainer.prompts_per_update=2", "algorithm.ppo_epochs=1", "algorithm.rollout_is_cap=2.0",
                 "rollout.temperature=0.7")
    [(metrics, calls, *_)] = run_workers(one_step, world_size=1,
                                         args=(str(model), str(data), str(tmp_path / "run"), overrides))
    assert calls == [("generate", 2, 6), ("engines_sleep",), ("logprobs", "reference", 8), ("train", 8),
                     ("engines_wake", "weights"), ("refit",), ("engines_wake", "kv_cache")]
    assert metrics["train/ratio_mean"] == pytest.approx(1.0) and metrics["train/grad_norm"] > 0
    assert metrics["rollout/logprob_gap_mean"] > 0.5 and metrics["rollout/logprob_gap_max"] >= metrics["rollout/logprob_gap_mean"]
    assert "train/logprob_gap_mean" not in metrics
    assert 0 < metrics["train/rollout_is_weight_mean"] < 1 and metrics["train/rollout_is_clip_fraction"] == 0.0


# per step, per request: the answers of its 4 voters (None: no answer). Oversampling 2x: 4 requests, 2 trained.
STEPS = [
    {0: ["1"] * 4, 1: ["1", "2", "1", "1"], 2: ["3"] * 4, 3: ["2", "2", "4", "4"]},  # groups 1 and 3 carry signal
    {0: ["1"] * 4, 1: ["1"] * 4, 2: ["5", "5", "1", None], 3: ["2"] * 4},  # only group 2: cannot refill
    {0: ["1"] * 4, 1: ["2"] * 4, 2: ["3"] * 4, 3: ["4"] * 4},  # every group unanimous: no update
]


def dropping_steps(model_dir: str, data: str, out: str):
    from mmupt_megatron.trainer.loop import Trainer
    from tests.trainer.in_process_cluster import InProcessCluster

    cfg = load_config("demo", [
        f"model.path={model_dir}", f"data.train_files=[{data}]", f"trainer.output_dir={out}", "trainer.steps=3",
        "trainer.prompts_per_step=2", "trainer.prompts_per_update=1", "rollout.n=4", "rollout.oversample=2",
        "rollout.max_new_tokens=8", "trainer.lr=1e-3", "algorithm.loss.kl_coef=0.1", "rollout.verify_refit=false",
        "trainer.micro_batch_size=2", "data.shuffle=false",
    ])
    current = {"step": 0}

    def script(index: int, sample: int) -> str:
        answer = STEPS[current["step"]][index][sample]
        return "i am not sure" if answer is None else f"so \\boxed{{{answer}}}"

    cluster = InProcessCluster(cfg, model_dir=model_dir, script=script)
    trainer = Trainer(cfg, cluster=cluster)
    results = []
    for step in range(3):
        current["step"] = step
        start = len(cluster.calls)
        metrics = trainer.step(step)
        results.append((metrics, cluster.calls[start:]))
    return results, cluster.trained_advantages, cluster.loss_scales


@pytest.mark.slow
def test_zero_advantage_groups_are_dropped_oversampling_refills_and_unanimous_steps_skip(tmp_path, capfd):
    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    data = write_splits(tmp_path / "data", num_train=8, num_test=1, seed=0)["train"]
    [(steps, advantages, scales)] = run_workers(dropping_steps, world_size=1, args=(str(model), str(data), str(tmp_path / "run")))
    (first, first_calls), (second, second_calls), (third, third_calls) = steps

    # step 0: 4 prompts sampled (oversample 2 x prompts_per_step 2); the two with signal are the only ones whose
    # log-probs are taken and that are trained on, one group per mini-batch (prompts_per_update=1)
    assert first_calls == [("generate", 4, 4), ("engines_sleep",), ("logprobs", "policy", 8),
                           ("logprobs", "reference", 8), ("train", 4), ("train", 4), ("engines_wake", "weights"),
                           ("refit",), ("engines_wake", "kv_cache")]
    assert first["groups/zero_share"] == 0.5 and first["groups/trained"] == 2 and first["groups/unfilled"] == 0
    # the metrics still describe all 16 rollouts: 4 + 3 + 4 + 2 agree with their group's majority
    assert first["reward"] == pytest.approx(13 / 16)
    assert first["majority_share"] == pytest.approx((1 + 3 / 4 + 1 + 2 / 4) / 4)
    assert all(a != 0.0 for a in advantages[0] + advantages[1])
    assert advantages[0][1] < 0 < advantages[0][0]  # group 1: "1", "2", "1", "1"

    # step 1: one group with signal, fewer than the 2 asked: trained on alone, counted as a fallback
    assert [c for c in second_calls if c[0] in ("logprobs", "train")] == [
        ("logprobs", "policy", 4), ("logprobs", "reference", 4), ("train", 4)]
    assert second["groups/trained"] == 1 and second["groups/unfilled"] == 1 and second["groups/unfilled_steps"] == 1
    assert second["groups/zero_share"] == 0.75 and second["no_answer"] == pytest.approx(1 / 16)
    # the loss is averaged over the full batch's tokens (algorithm.loss_over=batch): a full step as it is; here the
    # first dropped group (group 0, four "so \boxed{1}": as long as step 0's group 1) stands in for the missing one
    assert [scale for scale, _ in scales[:2]] == [(1.0, 1.0), (1.0, 1.0)]
    (token_scale, seq_scale), tokens = scales[2]
    assert seq_scale == 2.0 and token_scale * tokens == pytest.approx(tokens + scales[0][1])

    # step 2: all unanimous: no log-probs, no update (counted), the engine still wakes for the next rollout
    assert third_calls == [("generate", 4, 4), ("engines_sleep",), ("engines_wake", "weights"), ("refit",),
                           ("engines_wake", "kv_cache")]
    assert third["train/no_signal_skip"] == 1.0 and third["groups/no_signal_steps"] == 1
    assert third["groups/zero_share"] == 1.0 and third["reward"] == 1.0 and third["groups/trained"] == 0
    assert len(advantages) == 3  # 2 + 1 mini-batches trained in all
    out = capfd.readouterr().out
    assert "step 1: oversampling found 1 of 2 groups with signal; training on those (1 such steps so far)" in out
    assert "step 2: all 4 groups have zero advantages (unanimous), update skipped (1 such steps so far)" in out
