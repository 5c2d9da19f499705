"""Evaluation metrics over k sampled answers per question: pass@1, pass@k (unbiased), maj@k.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k), the probability that at least one of k samples drawn without
replacement from the n is correct. maj@k: whether the majority answer of the k samples (by equivalence,
ties as in ``majority_vote``) equals the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

from mmupt_megatron.algorithms.equivalence import AnswerMatcher
from mmupt_megatron.algorithms.vote import majority_vote


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"need 0 <= correct ({num_correct}) <= samples ({num_samples}) and 1 <= k ({k}) <= samples")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


@dataclass(frozen=True, slots=True)
class QuestionScore:
    """One question's sampled answers scored against its reference."""

    correct: list[bool]
    """Per sample: its answer equals the reference (a missing answer never does)."""
    majority_answer: str | None
    """The winning answer of the first k samples (``majority_vote``'s tie rule); None when none answered."""
    scores: dict[str, float]
    """pass@1, pass@k and, for k >= 2, maj@k and majority_share."""


def score_question(
    answers: Sequence[str | None], reference: str, *, matcher: AnswerMatcher, k: int | None = None
) -> QuestionScore:
    """pass@1 over all samples, pass@k (unbiased, from all n samples), maj@k over the first k samples."""
    if not answers:
        raise ValueError("no sampled answers to score")
    k = k or len(answers)
    correct = [a is not None and matcher.equal(a, reference) for a in answers]
    scores = {"pass@1": sum(correct) / len(correct), f"pass@{k}": pass_at_k(len(correct), sum(correct), k)}
    majority = answers[0]
    voters = list(answers[:k])
    if len(voters) >= 2:
        vote = majority_vote(voters, [0] * len(voters), matcher=matcher, labels={0: reference})
        majority = vote.groups[0].pseudo_label
        scores[f"maj@{k}"] = float(bool(vote.groups[0].pseudo_label_correct))
        scores["majority_share"] = vote.groups[0].majority_share
    return QuestionScore(correct=correct, majority_answer=majority, scores=scores)


def question_scores(
    answers: Sequence[str | None], reference: str, *, matcher: AnswerMatcher, k: int | None = None
) -> dict[str, float]:
    """pass@1, pass@k and maj@k of one question's sampled answers against its reference answer."""
    return score_question(answers, reference, matcher=matcher, k=k).scores
