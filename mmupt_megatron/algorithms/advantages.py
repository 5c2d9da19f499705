"""Group-relative advantages over explicit group ids (groups need not be contiguous).

- ``grpo``: (r - mean_g) / (std_g + eps), or without the std division when ``normalize_std=False``
  (Dr. GRPO's choice); std is the unbiased sample std, as in GRPO implementations.
- ``rloo``: r - mean of the *other* responses of the group = G/(G-1) * (r - mean_g).
- ``mean``: r - mean_g.
A group whose rewards are all equal (e.g. unanimous) gets advantage 0 everywhere; a group of one gets 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

ESTIMATORS = ("grpo", "rloo", "mean")


def group_index(group_ids: Sequence[Hashable]) -> tuple[torch.Tensor, int]:
    """Map arbitrary hashable group ids to dense indices 0..k-1 (in order of first appearance)."""
    dense: dict[Hashable, int] = {}
    index = [dense.setdefault(g, len(dense)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long), len(dense)


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: Sequence[Hashable],
    *,
    estimator: str = "grpo",
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One advantage per response (float32), computed within each response's group."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"algorithm.advantage must be one of {ESTIMATORS}, got {estimator!r}")
    rewards_N = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards_N.ndim != 1 or rewards_N.numel() != len(group_ids):
        raise ValueError(f"{rewards_N.numel()} rewards but {len(group_ids)} group ids")
    if not torch.isfinite(rewards_N).all():
        bad = torch.nonzero(~torch.isfinite(rewards_N)).flatten().tolist()
        raise ValueError(f"non-finite rewards at responses {bad[:5]}")
    index_N, num_groups = group_index(group_ids)
    count_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index_N, torch.ones_like(rewards_N))
    mean_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index_N, rewards_N) / count_G
    centered_N = rewards_N - mean_G[index_N]
    count_N = count_G[index_N]
    if estimator == "rloo":
        advantages_N = torch.where(count_N > 1, centered_N * count_N / (count_N - 1).clamp(min=1), 0.0)
    elif estimator == "grpo" and normalize_std:
        sq_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index_N, centered_N**2)
        std_G = torch.sqrt(sq_G / (count_G - 1).clamp(min=1))
        advantages_N = centered_N / (std_G[index_N] + eps)
    else:
        advantages_N = centered_N
    # exact zeros for groups without signal (float noise in the mean would otherwise leak through)
    max_G = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, index_N, rewards_N, "amax")
    min_G = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, index_N, rewards_N, "amin")
    has_signal_N = (count_N > 1) & (max_G > min_G)[index_N]
    advantages_N = torch.where(has_signal_N, advantages_N, 0.0)
    return advantages_N.to(torch.float32)
