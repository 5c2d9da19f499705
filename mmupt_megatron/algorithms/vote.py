"""Majority-vote self-reward (MM-UPT) over explicit group ids, and the supervised rule reward.

For every group (all responses sampled for one prompt):
- answers are clustered by equivalence (``AnswerMatcher``); responses without an answer (``None``) never vote
  and never earn reward, so a model cannot be rewarded for dropping its ``\\boxed{}``;
- the pseudo-label is the largest cluster. **Tie rule:** among clusters of equal size, the one whose
  smallest canonical form sorts first (by kind, then text) wins. It depends only on the multiset of answers,
  so permuting a group permutes its rewards and nothing else;
- ``majority_share`` = size of the winning cluster / number of responses in the group (no-answer responses
  count in the denominator: they are not agreement);
- reward: 1 for a response in the winning cluster, else 0; with ``soft=True`` every answered response earns
  its own cluster's share instead; when ``majority_share < min_agreement`` the whole group earns 0 and is
  flagged ``low_agreement`` (the guard against amplifying a wrong majority on hard data).

Before clustering, the groups' math-verify pairs go to the matcher's worker processes when it has some
(``AnswerMatcher.prepare``); the rewards are the same with or without them.

"Voting over more samples than are trained on" needs nothing special here: pass every sampled answer,
and train on the responses you choose; the rewards of the others are simply not used.

``labels`` (optional, one per group) feed diagnostics only (``pseudo_label_correct``). They never reach
the reward computation: rewards are computed before labels are looked at.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from mmupt_megatron.algorithms.equivalence import AnswerMatcher


@dataclass(frozen=True, slots=True)
class GroupVote:
    """Per-group diagnostics of one vote."""

    group_id: Hashable
    num_responses: int
    num_no_answer: int
    num_distinct: int
    """Number of distinct answers after equivalence clustering."""
    pseudo_label: str | None
    """The most common raw spelling in the winning cluster; None when nobody answered."""
    majority_share: float
    entropy: float
    """Entropy (nats) of the cluster distribution over answered responses."""
    low_agreement: bool
    pseudo_label_correct: bool | None
    """Only when a holdout label was given for this group."""


@dataclass(frozen=True, slots=True)
class VoteResult:
    rewards: list[float]
    """One reward per response, in input order."""
    in_majority: list[bool]
    """Whether each response's answer is in its group's winning cluster."""
    groups: dict[Hashable, GroupVote]
    equivalence_timeouts: int = 0
    """math-verify calls in this vote that ran past ``reward.verify_timeout_s`` (each was re-run without a
    limit, so it cost time, not a verdict): log it as ``reward/equivalence_timeouts``."""


def _check_inputs(answers: Sequence[str | None], group_ids: Sequence[Hashable]) -> None:
    if len(answers) != len(group_ids):
        raise ValueError(f"{len(answers)} answers but {len(group_ids)} group ids: they must pair up one to one")
    if not answers:
        raise ValueError("nothing to vote on: the batch has no responses")
    for index, answer in enumerate(answers):
        if answer is not None and not isinstance(answer, str):
            raise TypeError(f"answer {index} is {type(answer).__name__}; expected str or None")


def _group_indices(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group_id in enumerate(group_ids):
        members[group_id].append(index)
    for group_id, indices in members.items():
        if len(indices) < 2:
            raise ValueError(f"group {group_id!r} has a single response: majority voting needs n >= 2")
    return members


def majority_vote(
    answers: Sequence[str | None],
    group_ids: Sequence[Hashable],
    *,
    matcher: AnswerMatcher,
    min_agreement: float = 0.0,
    soft: bool = False,
    labels: Mapping[Hashable, str] | None = None,
) -> VoteResult:
    """Rewards and per-group diagnostics of the majority vote (see module docstring)."""
    _check_inputs(answers, group_ids)
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    rewards = [0.0] * len(answers)
    in_majority = [False] * len(answers)
    votes: dict[Hashable, tuple] = {}
    timeouts_before = matcher.num_timeouts
    members = _group_indices(group_ids)
    matcher.prepare([[answers[i] for i in indices if answers[i] is not None] for indices in members.values()])
    for group_id, indices in members.items():
        answered = [i for i in indices if answers[i] is not None]
        if not answered:
            votes[group_id] = (len(indices), 0, None, 0.0, 0.0, False, None)
            continue
        cluster_of = dict(zip(answered, matcher.cluster([answers[i] for i in answered]), strict=True))
        sizes = Counter(cluster_of.values())
        # cluster ids are numbered by smallest canonical form, so min over (-size, id) is the tie rule
        winner = min(sizes, key=lambda c: (-sizes[c], c))
        share = sizes[winner] / len(indices)
        low_agreement = share < min_agreement
        for i in answered:
            in_majority[i] = cluster_of[i] == winner
            if not low_agreement:
                rewards[i] = sizes[cluster_of[i]] / len(indices) if soft else float(in_majority[i])
        spellings = Counter(answers[i] for i in answered if cluster_of[i] == winner)
        pseudo_label = min(spellings, key=lambda s: (-spellings[s], s))
        entropy = -sum((n / len(answered)) * math.log(n / len(answered)) for n in sizes.values())
        votes[group_id] = (len(indices), len(sizes), pseudo_label, share, entropy, low_agreement, answered)

    groups: dict[Hashable, GroupVote] = {}
    for group_id, (num, distinct, pseudo_label, share, entropy, low_agreement, answered) in votes.items():
        correct = None
        if labels is not None and group_id in labels:
            correct = pseudo_label is not None and matcher.equal(pseudo_label, str(labels[group_id]))
        groups[group_id] = GroupVote(
            group_id=group_id,
            num_responses=num,
            num_no_answer=num - (len(answered) if answered else 0),
            num_distinct=distinct,
            pseudo_label=pseudo_label,
            majority_share=share,
            entropy=entropy,
            low_agreement=low_agreement,
            pseudo_label_correct=correct,
        )
    return VoteResult(rewards=rewards, in_majority=in_majority, groups=groups,
                      equivalence_timeouts=matcher.num_timeouts - timeouts_before)


def label_rewards(
    answers: Sequence[str | None],
    group_ids: Sequence[Hashable],
    *,
    labels: Mapping[Hashable, str],
    matcher: AnswerMatcher,
) -> list[float]:
    """Supervised rule reward (the paper's upper reference): 1 when the answer equals its group's label."""
    _check_inputs(answers, group_ids)
    missing = sorted({repr(g) for g in group_ids if g not in labels})
    if missing:
        raise ValueError(f"reward.kind=label needs an answer for every prompt; missing for groups {missing[:5]}")
    return [
        float(answer is not None and matcher.equal(answer, str(labels[group_id])))
        for answer, group_id in zip(answers, group_ids, strict=True)
    ]
