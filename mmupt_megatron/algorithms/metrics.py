"""Evaluation metrics over k sampled answers per question: pass@1, pass@k (unbiased), maj@k.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k), the probability that at least one of k samples drawn without
replacement from the n is correct. maj@k: whether the majority answer of the k samples (by equivalence,
ties as in ``majority_vote``) equals the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

from mmupt_megatron.algorithms.equivalence import AnswerMatcher
from mmupt_megatron.algorithms.vote import majority_vote


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"need 0 <= correct ({num_correct}) <= samples ({num_samples}) and 1 <= k ({k}) <= samples")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def question_scores(
    answers: Sequence[str | None], reference: str, *, matcher: AnswerMatcher, k: int | None = None
) -> dict[str, float]:
    """pass@1, pass@k and maj@k of one question's sampled answers against its reference answer."""
    if not answers:
        raise ValueError("no sampled answers to score")
    k = k or len(answers)
    correct = [a is not None and matcher.equal(a, reference) for a in answers]
    scores = {"pass@1": sum(correct) / len(correct), f"pass@{k}": pass_at_k(len(correct), sum(correct), k)}
    if len(answers) >= 2:
        vote = majority_vote(list(answers[:k]), [0] * min(k, len(answers)), matcher=matcher, labels={0: reference})
        scores[f"maj@{k}"] = float(bool(vote.groups[0].pseudo_label_correct))
        scores["majority_share"] = vote.groups[0].majority_share
    return scores
