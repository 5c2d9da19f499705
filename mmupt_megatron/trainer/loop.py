"""The MM-UPT training loop: rollout -> majority vote -> advantages -> GRPO update -> refit.

    mmupt train RECIPE [section.key=value ...]

Each step, for a batch of unlabeled (image, question) prompts:
1. the rollout engine samples ``rollout.num_voters`` responses per prompt;
2. each response's final ``\\boxed{}`` answer is extracted; the majority answer of its group is the
   pseudo-label and agreeing responses earn reward 1 (``reward.kind=label`` uses the data's answers instead:
   the supervised reference);
3. the first ``rollout.n`` responses per prompt are trained on with group-normalised advantages; groups whose
   advantages are all zero are left out (``algorithm.drop_zero_advantage_groups``; with ``rollout.oversample``
   more prompts are sampled and the first ``trainer.prompts_per_step`` groups with signal are kept), the loss
   still averaged over the full batch's tokens (``algorithm.loss_over``);
4. old (and, with KL, reference) log-probs come from the Megatron policy, at the sampling temperature; the GRPO
   loss is minimised for ``algorithm.ppo_epochs`` passes over mini-batches of ``trainer.prompts_per_update``
   prompts. When that is exactly one update (one epoch, one mini-batch) it is on policy: no old-log-prob pass,
   the training forward's own log-probs (detached) are the old ones and give the engine-gap metrics;
5. the new weights are loaded into the engine (refit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any


from mmupt_megatron.algorithms import AnswerMatcher, extract_answers, group_advantages, label_rewards, majority_vote
from mmupt_megatron.algorithms.group_selection import filled_batch_scale, minibatch_bounds, select_groups
from mmupt_megatron.algorithms.loss import logprob_gap
from mmupt_megatron.config import Config
from mmupt_megatron.data.configured import image_encoder, open_dataset, prompt_for
from mmupt_megatron.data.sampler import ResumableSampler
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.eval.evaluator import evaluate, held_out_items
from mmupt_megatron.models.qwen2_5_vl import check_fp8
from mmupt_megatron.synthesis.online import pool_refresher
from mmupt_megatron.trainer import checkpoint as ckpt
from mmupt_megatron.trainer.batching import engine_logprobs, pack_rollouts, take_sequences
from mmupt_megatron.trainer.metrics_log import (
    MetricsLog,
    check_resume_files,
    combine_metrics,
    open_metrics_log,
    plot_metrics,
)
from mmupt_megatron.trainer.run_dir import claim_output_dir, releases_output_dir


@dataclass
class StepTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


class Trainer:
    def __init__(self, cfg: Config, *, cluster: Any = None) -> None:
        check_fp8(cfg.model.fp8, cfg.model.fp8_recipe)  # the machine can run the config: first of all
        # model, layout, output folder, resume (check_before_start); the folder apart from the inputs and locked
        # against a second run on it, released when fit ends: all before Ray starts
        self.run_lock = claim_output_dir(cfg)
        check_resume_files(cfg)  # metrics.jsonl, wandb.json: a damaged one named before any checkpoint loads
        if not cfg.data.train_files:
            raise ValueError("data.train_files is empty: give parquet/JSONL files or folders of questions")
        self.cfg = cfg
        d = cfg.data
        self.dataset = open_dataset(d.train_files, d)
        if self.dataset.skipped.total:
            print(f"data: {self.dataset.skipped.summary()}", flush=True)
        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.trainer.seed, shuffle=d.shuffle)
        self.bad_steps = 0
        self.no_signal_steps = 0  # steps whose groups all had zero advantages: no update
        self.unfilled_steps = 0  # oversampling steps that found fewer than prompts_per_step groups with signal
        self.images = image_encoder(d)
        # reward.num_workers: math-verify pairs in a pool started by the first vote that needs it (closed by fit)
        self.matcher = AnswerMatcher(use_math_verify=cfg.reward.use_math_verify, timeout_s=cfg.reward.verify_timeout_s,
                                     num_workers=cfg.reward.num_workers)
        if cluster is None:
            from mmupt_megatron.trainer.cluster import Cluster

            cluster = Cluster(cfg, model_dir=cfg.model.path)
        self.cluster = cluster
        self.out_dir = Path(cfg.trainer.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.held_out = held_out_items(d.eval_files, d) if d.eval_files else []
        self.first_pass_at_k: float | None = None
        self.refresher = pool_refresher(cfg, self.dataset.samples, cluster=cluster, out_dir=self.out_dir)

    # -- one step, as the algorithm -------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, StepTimer()
        samples = [self.dataset[i] for i in self.sampler.next_batch(cfg.rollout.prompts_to_sample(cfg.trainer.prompts_per_step))]
        prompts = [prompt_for(sample.question, cfg.data) for sample, _ in samples]
        fitted = [self.images.fit(image) for _, image in samples]
        # group id = position in this step's batch: the same question drawn twice still votes separately
        requests = [RolloutRequest(group_id=i, prompt=p, images=[img]) for i, (p, img) in enumerate(zip(prompts, fitted))]
        labels = {i: sample.answer for i, (sample, _) in enumerate(samples) if sample.answer is not None}

        with timer("rollout"):
            rollouts = self._generate(requests, step)
            self.cluster.release_engine()  # colocated: the engine sleeps until the refit wakes it
        with timer("reward"):
            answers = extract_answers([r.text for r in rollouts])
            group_ids = [r.group_id for r in rollouts]
            vote = majority_vote(answers, group_ids, matcher=self.matcher, min_agreement=cfg.reward.min_agreement,
                                 soft=cfg.reward.soft, labels=labels)
            rewards = vote.rewards
            if cfg.reward.kind == "label":
                rewards = label_rewards(answers, group_ids, labels=labels, matcher=self.matcher)
        trained = [i for i, r in enumerate(rollouts) if r.sample_index < cfg.rollout.n]
        advantages = group_advantages([rewards[i] for i in trained], [group_ids[i] for i in trained],
                                      estimator=cfg.algorithm.advantage, normalize_std=cfg.algorithm.normalize_std)
        selection = select_groups(advantages.tolist(), [group_ids[i] for i in trained],
                                  target_groups=cfg.trainer.prompts_per_step,
                                  drop_zero=cfg.algorithm.drop_zero_advantage_groups)
        train_rollouts = [rollouts[trained[j]] for j in selection.keep]
        selected = self._note_selection(step, selection)
        if not train_rollouts:  # every group unanimous: nothing to learn from, no update (counted above)
            with timer("refit"):
                self.cluster.refit()  # the weights are unchanged; the refit wakes the engine (colocated schedule)
            return {**self._metrics(step, rollouts, answers, rewards, vote, {"no_signal_skip": 1.0}, timer), **selected,
                    **self.cluster.traffic.pop()}
        # the trained prompts' images only (oversampled and dropped prompts never reach the policy)
        encoded = {p: self.images.encode([fitted[p]]) for p in dict.fromkeys(r.prompt_index for r in train_rollouts)}
        batch = pack_rollouts(train_rollouts, pad_id=self._pad_id(), images=encoded,
                              advantages_B=advantages[list(selection.keep)])
        engine_BT = engine_logprobs(train_rollouts, batch.loss_mask_BT)
        # one epoch of one mini-batch (the kept groups never outnumber prompts_per_step): the training forward's own
        # log-probs, detached, are the old ones and give the engine gap
        on_policy = cfg.on_policy()
        if on_policy or cfg.algorithm.rollout_is_cap is not None:  # the workers need them (gap, TIS)
            batch.engine_logprobs_BT = engine_BT

        gap: dict[str, Any] = {}
        with timer("logprobs"):
            if not on_policy:  # on policy the training forward gives them (and the gap below)
                batch.old_logprobs_BT = self.cluster.logprobs(batch)
                gap = logprob_gap(batch.old_logprobs_BT, engine_BT, batch.loss_mask_BT)
            if cfg.algorithm.loss.kl_coef > 0:
                batch.ref_logprobs_BT = self.cluster.logprobs(batch, reference=True)
        with timer("train"):
            scale = (filled_batch_scale(selection, [len(rollouts[i].response_token_ids) for i in trained])
                     if cfg.algorithm.loss_over == "batch" else (1.0, 1.0))
            train_metrics = self._update(batch, [r.group_id for r in train_rollouts], scale=scale)
        gap = {key: train_metrics.pop(key) for key in ("logprob_gap_mean", "logprob_gap_max")} if on_policy else gap
        # engine vs policy on the sampled tokens: large values mean the two models disagree (refit, prompt layout,
        # position ids, temperature), and the update then trains a different model from the one sampled
        engine_gap = {f"rollout/{key}": float(value) for key, value in gap.items()}
        if train_metrics.get("skipped", 0.0) > 0:
            self.bad_steps += 1
            print(f"step {step}: non-finite gradients, update skipped ({self.bad_steps} so far)", flush=True)
            if self.bad_steps > cfg.trainer.max_bad_steps:
                raise RuntimeError(
                    f"{self.bad_steps} steps had non-finite (NaN/inf) gradients, more than trainer.max_bad_steps="
                    f"{cfg.trainer.max_bad_steps}: stopping. Lower trainer.lr, or check the model and data."
                )
        with timer("refit"):
            self.cluster.refit()
        if cfg.rollout.verify_refit:
            with timer("verify_refit"):
                train_metrics["refit_max_diff"] = self._verify_refit(requests, train_rollouts, encoded)
        return {**self._metrics(step, rollouts, answers, rewards, vote, train_metrics, timer), **engine_gap, **selected,
                **self.cluster.traffic.pop()}

    def _note_selection(self, step: int, selection) -> dict[str, float]:  # noqa: ANN001 - GroupSelection
        """Metrics of the group selection; counts and reports the steps that train on fewer groups than asked."""
        if not selection.kept_groups:
            self.no_signal_steps += 1
            print(f"step {step}: all {selection.sampled_groups} groups have zero advantages (unanimous), update "
                  f"skipped ({self.no_signal_steps} such steps so far)", flush=True)
        elif selection.unfilled and self.cfg.rollout.oversample > 1:
            self.unfilled_steps += 1
            print(f"step {step}: oversampling found {len(selection.kept_groups)} of {selection.target_groups} groups "
                  f"with signal; training on those ({self.unfilled_steps} such steps so far)", flush=True)
        return {"groups/zero_share": selection.zero_share, "groups/trained": float(len(selection.kept_groups)),
                "groups/unfilled": float(selection.unfilled), "groups/no_signal_steps": float(self.no_signal_steps),
                "groups/unfilled_steps": float(self.unfilled_steps)}

    def _verify_refit(self, requests, rollouts: list[Rollout], encoded) -> float:
        """Every engine's log-probs of a few trained responses vs the updated policy's (rollout.verify_refit)."""
        from mmupt_megatron.engines.weight_sync import refit_tolerance, verify_refit

        # one response from each of the first prompts: different images in one batch (a probe of one
        # prompt's samples cannot tell whether each sample sees its own image)
        first: dict[int, Rollout] = {}
        for r in rollouts:
            if r.response_token_ids:
                first.setdefault(r.prompt_index, r)
        probe = list(first.values())[:4]
        # at temperature 1: the engine scores given tokens before its sampler (VLLMRolloutEngine.prompt_logprobs)
        logprobs_BT = self.cluster.logprobs(pack_rollouts(probe, pad_id=self._pad_id(), images=encoded), temperature=1.0)
        policy = [logprobs_BT[b, len(r.prompt_token_ids) - 1 : len(r.prompt_token_ids) - 1 + len(r.response_token_ids)]
                  for b, r in enumerate(probe)]
        probe_requests, completions = [requests[r.prompt_index] for r in probe], [r.response_token_ids for r in probe]
        return max(
            verify_refit(SimpleNamespace(prompt_logprobs=partial(self.cluster.prompt_logprobs, engine=e)),
                         probe_requests, completions, policy,
                         tol=self.cfg.rollout.verify_refit_tol or refit_tolerance(self.cluster.param_dtype))
            for e in range(self.cluster.num_engines)
        )

    def _generate(self, requests: list[RolloutRequest], step: int) -> list[Rollout]:
        r = self.cfg.rollout
        spec = SamplingSpec(n=r.num_voters, temperature=r.temperature, top_p=r.top_p,
                            max_new_tokens=r.max_new_tokens, seed=r.seed + 1_000_003 * step,
                            per_request=r.seed_per_request)
        return self.cluster.generate(requests, spec)

    def _pad_id(self) -> int:
        tokens = self.cluster.tokens
        return tokens["pad_id"] if tokens["pad_id"] is not None else tokens["eos_id"]

    def _update(self, batch, group_ids: list[int], *, scale: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:
        """``ppo_epochs`` passes over mini-batches of ``trainer.prompts_per_update`` whole prompt groups (the last
        one holds the rest when groups were dropped); each mini-batch's loss normaliser times ``scale``."""
        bounds = minibatch_bounds(group_ids, self.cfg.trainer.prompts_per_update)
        metrics: list[dict[str, float]] = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            for start, stop in bounds:
                minibatch = take_sequences(batch, start, stop, image_token_id=self.cluster.image_token_id)
                metrics.append(self.cluster.train(minibatch, scale=scale))
        return combine_metrics(metrics)

    def _metrics(self, step, rollouts, answers, rewards, vote, train_metrics, timer) -> dict[str, float]:
        groups = list(vote.groups.values())
        judged = [g.pseudo_label_correct for g in groups if g.pseudo_label_correct is not None]
        tokens = sum(len(r.response_token_ids) for r in rollouts)
        out = {
            "step": step,
            "reward": sum(rewards) / len(rewards),
            "majority_share": sum(g.majority_share for g in groups) / len(groups),
            "reward/equivalence_timeouts": float(vote.equivalence_timeouts),
            "low_agreement_groups": sum(g.low_agreement for g in groups) / len(groups),
            "no_answer": sum(a is None for a in answers) / len(answers),
            "response_length": tokens / len(rollouts),
            "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            **({"pseudo_label_accuracy": sum(judged) / len(judged)} if judged else {}),
            **{f"train/{k}": v for k, v in train_metrics.items()},
            **{f"time/{k}": v for k, v in timer.seconds.items()},
        }
        out["tokens_per_s"] = tokens / max(timer.seconds.get("rollout", 1e-9), 1e-9)
        return out

    @releases_output_dir
    def fit(self) -> list[dict[str, float]]:
        """Train from the latest checkpoint (``trainer.resume``) to ``trainer.steps``; export the policy."""
        cfg = self.cfg
        first = self._resume()
        log = open_metrics_log(cfg, self.out_dir, first_step=first, resumed_from=self.resumed_from)
        history: list[dict[str, float]] = []
        try:
            for step in range(first, cfg.trainer.steps):
                refreshed = self.refresher.before_step(step)  # online synthesis (synthesis.refresh_every)
                metrics = {**self.step(step), **refreshed}
                last = step == cfg.trainer.steps - 1
                if self.held_out and (step == 0 or last or (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0)):
                    metrics.update(self._evaluate(log))
                history.append(metrics)
                log.write(metrics)
                if not cfg.logging.progress and (step % 10 == 0 or last):
                    print(f"    step {step:>3}: reward {metrics['reward']:.3f}, majority share {metrics['majority_share']:.3f}"
                          + (f", pseudo-label acc {metrics['pseudo_label_accuracy']:.3f}" if "pseudo_label_accuracy" in metrics else "")
                          + (f", {metrics['groups/zero_share']:.0%} of groups without signal" if "groups/zero_share" in metrics else "")
                          + f", {sum(v for k, v in metrics.items() if k.startswith('time/')):.1f} s", flush=True)
                if last or (cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0):
                    self._save(step, log)
            if cfg.logging.plots:
                log.add_plots(plot_metrics(log.path, self.out_dir / "plots"))
        finally:
            log.close()
            self.matcher.close()
        if cfg.checkpoint.export_hf:
            self.export_hf(self.out_dir / "hf")
        return history

    def _evaluate(self, log: MetricsLog) -> dict[str, float]:
        """Held-out pass@1 / maj@k / pass@k with the current engine; alarm when pass@k collapses."""
        k = self.cfg.trainer.eval_k
        r = self.cfg.rollout
        report = evaluate(self.cluster.generate, self.held_out,
                          k=k, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                          seed=r.seed, matcher=self.matcher)
        out = {f"eval/{key.replace(f'@{k}', '@k')}": value for key, value in report.metrics.items()}
        self.first_pass_at_k = self.first_pass_at_k if self.first_pass_at_k is not None else out.get("eval/pass@k")
        if self.first_pass_at_k and out.get("eval/pass@k", 1.0) < self.cfg.logging.collapse_alarm * self.first_pass_at_k:
            out["alarm/collapse"] = 1.0
            log.note(f"ALARM: held-out pass@{k} fell to {out['eval/pass@k']:.3f} from {self.first_pass_at_k:.3f} "
                     "(the majority may be amplifying wrong answers; see reward.min_agreement)")
        return out

    def _resume(self) -> int:
        """Load the checkpoint ``trainer.resume`` selects (the newest that loads; if any); the first step to run."""
        self.resumed_from = None
        found = ckpt.load_latest(self.cfg.trainer.resume, self.out_dir, self._load_checkpoint)
        if found is None:
            return 0
        folder, state = found
        self.resumed_from = folder
        self.sampler.load_state_dict(state["sampler"])
        self.refresher.restore(int(state["step"]))
        self.cluster.refit()  # the engine must serve the restored weights
        print(f"resumed from {folder} (step {state['step']} done)", flush=True)
        return int(state["step"]) + 1

    def _load_checkpoint(self, folder: Path) -> dict:
        self.cluster.load(str(folder))
        return ckpt.read_driver_state(folder)

    def _save(self, step: int, log: MetricsLog | None = None) -> Path:
        from mmupt_megatron.config_loading import config_to_yaml

        tmp = ckpt.begin(ckpt.checkpoints_root(self.out_dir), step)
        with ckpt.removed_if_disk_full(tmp):  # a full disk: "no space left on ...", this partial .tmp removed
            self.cluster.save(str(tmp))
            ckpt.write_driver_state(tmp, step=step, sampler_state=self.sampler.state_dict(),
                                    config_yaml=config_to_yaml(self.cfg))
            if log is not None:
                log.save_state(tmp)  # the W&B run id, so a resume continues that run
            return ckpt.commit(tmp, keep_last=self.cfg.checkpoint.keep_last)

    def export_hf(self, out_dir: Path) -> Path:
        """The current policy as a Hugging Face folder (weights + the base model's config and tokenizer)."""
        import shutil

        from mmupt_megatron.models.convert import copy_hf_metadata

        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.cluster.export_hf(str(tmp))
        copy_hf_metadata(self.cfg.model.path, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return out_dir


__all__ = ["Trainer"]
