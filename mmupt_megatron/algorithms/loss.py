"""GRPO policy loss: clipped importance ratio (asymmetric clip + dual clip) plus KL to a reference.

Per token t of response b, with ratio r = exp(logp - old_logp) and advantage A:
    pg = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
    pg = min(pg, -A * dual_clip)                      for A < 0 (dual clip, bounds the loss of a bad ratio)
    loss_t = pg + kl_coef * KL_t                      KL_t by the k1 / k2 / k3 estimator of KL(pi || ref)
k3 is the low-variance, non-negative estimator exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10].

Truncated importance sampling (TIS, as in verl) corrects for the rollout engine sampling from a slightly
different distribution than the policy's (other kernels, bf16/FP8, top-p truncation): with the engine's
log-prob of each sampled token, the policy-gradient term is multiplied by the detached weight
    w_t = min(exp(old_logp - engine_logp), cap)                       (``truncated_is_weights``)
so ``pg`` above becomes ``w * pg``; the KL term is not weighted.

Aggregation divides by *global* counts given by the caller, so summing the per-shard losses of a
data-parallel batch gives exactly the full-batch loss (and gradient):
- ``token-mean``:               sum_bt loss / global_num_tokens
- ``seq-mean-token-mean``:      sum_b mean_t loss / global_num_seqs
- ``seq-mean-token-sum``:       sum_b sum_t loss / global_num_seqs
- ``seq-mean-token-sum-norm``:  sum_bt loss / (global_num_seqs * norm_length)   (Dr. GRPO)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(kw_only=True)
class PolicyLossConfig:
    """The GRPO loss's settings; also the run config's ``algorithm.loss`` section (one definition of each)."""

    clip_low: float = 0.2
    """Lower clip: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.3
    """Upper clip: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher)."""
    dual_clip: float | None = 3.0
    """For negative advantages, the loss is capped at -A * dual_clip (> 1); null disables it."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference term; 0 disables it (and the reference model)."""
    kl_estimator: str = "k3"
    """k1 (log-ratio), k2 (squared log-ratio / 2) or k3 (low-variance, clamped)."""
    loss_agg: str = "token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm (see the loss module)."""
    norm_length: int | None = None
    """The constant length of seq-mean-token-sum-norm; the trainer defaults it to rollout.max_new_tokens."""

    def problems(self, prefix: str = "") -> list[str]:
        """What is wrong with these settings, each naming its key (``prefix`` + name)."""
        out = []
        if not 0 <= self.clip_low < 1:
            out.append(f"{prefix}clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            out.append(f"{prefix}clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            out.append(f"{prefix}dual_clip must be > 1 (or null), got {self.dual_clip}")
        if not self.kl_coef >= 0:
            out.append(f"{prefix}kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            out.append(f"{prefix}kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            out.append(f"{prefix}loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.norm_length is not None and self.norm_length < 1:
            out.append(f"{prefix}norm_length must be >= 1 (or null), got {self.norm_length}")
        return out

    def check(self) -> PolicyLossConfig:
        """``self``, or ValueError naming every problem; also that seq-mean-token-sum-norm has its length."""
        problems = self.problems()
        if self.loss_agg == "seq-mean-token-sum-norm" and not self.norm_length:
            problems.append("loss_agg=seq-mean-token-sum-norm needs norm_length (e.g. the max response length)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def kl_penalty(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi."""
    log_ratio = logprobs_BT - ref_logprobs_BT
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = -log_ratio
        return (neg.exp() - neg - 1).clamp(min=-10.0, max=10.0)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def aggregate(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, *, cfg: PolicyLossConfig, global_num_tokens: float, global_num_seqs: float
) -> torch.Tensor:
    masked_BT = loss_BT * mask_BT
    if cfg.loss_agg == "token-mean":
        return masked_BT.sum() / max(global_num_tokens, 1)
    if cfg.loss_agg == "seq-mean-token-mean":
        per_seq_B = masked_BT.sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
        return per_seq_B.sum() / max(global_num_seqs, 1)
    if cfg.loss_agg == "seq-mean-token-sum":
        return masked_BT.sum() / max(global_num_seqs, 1)
    assert cfg.loss_agg == "seq-mean-token-sum-norm" and cfg.norm_length
    return masked_BT.sum() / (max(global_num_seqs, 1) * cfg.norm_length)


def check_rollout_is_cap(cap: float | None, key: str = "rollout_is_cap") -> list[str]:
    """What is wrong with a TIS cap (``key`` names it in the message): it must be null or a finite number > 1."""
    if cap is None or (isinstance(cap, (int, float)) and 1 < cap < float("inf")):
        return []
    return [f"{key} must be > 1 (or null: off), got {cap}"]


def truncated_is_weights(
    old_logprobs_BT: torch.Tensor, engine_logprobs_BT: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token TIS weights ``min(exp(old - engine), cap)`` (detached, float32) and where the cap applied."""
    problems = check_rollout_is_cap(cap, "cap")
    if problems:
        raise ValueError(problems[0])
    if old_logprobs_BT.shape != engine_logprobs_BT.shape:
        raise ValueError(f"shape mismatch: old logprobs {tuple(old_logprobs_BT.shape)}, engine logprobs "
                         f"{tuple(engine_logprobs_BT.shape)}")
    with torch.no_grad():
        raw_BT = (old_logprobs_BT.float() - engine_logprobs_BT.float()).clamp(-20.0, 20.0).exp()
        return raw_BT.clamp(max=cap), raw_BT > cap


def logprob_gap(logprobs_BT: torch.Tensor, engine_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """|policy - engine| log-prob of the masked tokens: ``logprob_gap_mean`` (over them) and ``logprob_gap_max``.
    Large values mean the two models disagree (refit, prompt layout, position ids, temperature)."""
    with torch.no_grad():
        gap_BT = (logprobs_BT.float() - engine_logprobs_BT.float()).abs() * mask_BT
        return {"logprob_gap_mean": gap_BT.sum() / mask_BT.sum().clamp(min=1), "logprob_gap_max": gap_BT.max()}


def grpo_policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    cfg: PolicyLossConfig,
    global_num_tokens: float,
    global_num_seqs: float,
    ref_logprobs_BT: torch.Tensor | None = None,
    engine_logprobs_BT: torch.Tensor | None = None,
    rollout_is_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of this shard (see module docstring) and detached metrics averaged over its tokens.

    ``advantages_B`` may be per sequence [B] or per token [B, T]. ``rollout_is_cap``: truncated importance
    sampling against ``engine_logprobs_BT`` (the rollout engine's log-probs of the same tokens).
    """
    cfg.check()
    if logprobs_BT.shape != old_logprobs_BT.shape or logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shape mismatch: logprobs {tuple(logprobs_BT.shape)}, old {tuple(old_logprobs_BT.shape)}, "
            f"mask {tuple(mask_BT.shape)}"
        )
    if cfg.kl_coef > 0 and ref_logprobs_BT is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs_BT (log-probs of the reference policy)")
    if rollout_is_cap is not None and engine_logprobs_BT is None:
        raise ValueError("rollout_is_cap needs engine_logprobs_BT (the rollout engine's log-probs)")
    mask_BT = mask_BT.to(logprobs_BT.dtype)
    adv_BT = advantages_B[:, None].expand_as(logprobs_BT) if advantages_B.ndim == 1 else advantages_B
    log_ratio_BT = (logprobs_BT - old_logprobs_BT).clamp(-20.0, 20.0)
    ratio_BT = log_ratio_BT.exp()
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg_BT = torch.maximum(unclipped_BT, clipped_BT)
    dual_clipped_BT = torch.zeros_like(pg_BT, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap_BT = -adv_BT * cfg.dual_clip
        dual_clipped_BT = (adv_BT < 0) & (pg_BT > cap_BT)
        pg_BT = torch.where(dual_clipped_BT, cap_BT, pg_BT)
    if rollout_is_cap is not None:
        is_weights_BT, is_capped_BT = truncated_is_weights(old_logprobs_BT, engine_logprobs_BT, rollout_is_cap)
        pg_BT = pg_BT * is_weights_BT
    loss_BT = pg_BT
    kl_BT = None
    if ref_logprobs_BT is not None:
        kl_BT = kl_penalty(logprobs_BT, ref_logprobs_BT, cfg.kl_estimator)
        if cfg.kl_coef > 0:
            loss_BT = pg_BT + cfg.kl_coef * kl_BT
    loss = aggregate(loss_BT, mask_BT, cfg=cfg, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)

    with torch.no_grad():
        num_local = mask_BT.sum().clamp(min=1)

        def local_mean(value_BT: torch.Tensor) -> torch.Tensor:
            return (value_BT.float() * mask_BT).sum() / num_local

        metrics = {
            "pg_loss": local_mean(pg_BT),
            "clip_fraction": local_mean(clipped_BT > unclipped_BT),
            "dual_clip_fraction": local_mean(dual_clipped_BT),
            "ratio_mean": local_mean(ratio_BT),
            "approx_kl_old": local_mean(kl_penalty(logprobs_BT, old_logprobs_BT, "k3")),
            "num_tokens": mask_BT.sum(),
        }
        if kl_BT is not None:
            metrics["kl_ref"] = local_mean(kl_BT)
        if rollout_is_cap is not None:
            metrics["rollout_is_weight_mean"] = local_mean(is_weights_BT)
            metrics["rollout_is_clip_fraction"] = local_mean(is_capped_BT)
    return loss, metrics
