"""Which prompt groups a step trains on: groups without signal are dropped, oversampled groups refill the batch.

A group whose advantages are all zero (a unanimous vote, or all-equal rewards) adds nothing to the policy
gradient: its clipped-ratio term is exactly 0 for every token. ``select_groups`` keeps the groups that carry
signal, in the order they were sampled, up to ``target_groups`` (with oversampling more groups were sampled
than are trained on; the surplus is left out). Groups are identified by their ids; a group's responses need not
be contiguous in the input, but the selection lists them group by group (mini-batches then take whole groups).

With ``drop_zero=False`` the first ``target_groups`` groups are kept whatever their advantages (the behaviour
without this selection).

``filler`` names the dropped groups that stand in for the missing ones when fewer than ``target_groups`` groups
carry signal (the first zero-advantage groups sampled): counting their tokens in the loss's normaliser makes the
update the one the full batch would give (``algorithm.loss_over="batch"``), so a step that learns from few
groups moves the policy by their share of the batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupSelection:
    keep: tuple[int, ...]
    """Positions of the responses to train on, group by group (groups in order of first appearance)."""
    kept_groups: tuple[Hashable, ...]
    """The kept groups' ids, in training order."""
    sampled_groups: int
    """Groups in the input (prompts sampled this step, oversampled ones included)."""
    zero_groups: int
    """Groups of the input whose advantages are all zero."""
    target_groups: int
    """Groups the step wanted to train on."""
    filler: tuple[int, ...] = ()
    """Positions of the responses of the zero-advantage groups that fill the batch up to ``target_groups``."""

    @property
    def unfilled(self) -> int:
        """Groups short of the target (not enough groups with signal were sampled)."""
        return self.target_groups - len(self.kept_groups)

    @property
    def zero_share(self) -> float:
        """Share of the sampled groups without signal."""
        return self.zero_groups / self.sampled_groups if self.sampled_groups else 0.0


def select_groups(advantages: Sequence[float], group_ids: Sequence[Hashable], *, target_groups: int,
                  drop_zero: bool = True) -> GroupSelection:
    """The responses to train on (see the module docstring)."""
    if len(advantages) != len(group_ids):
        raise ValueError(f"{len(advantages)} advantages but {len(group_ids)} group ids")
    if target_groups < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    members: dict[Hashable, list[int]] = {}
    for position, group in enumerate(group_ids):
        members.setdefault(group, []).append(position)
    with_signal = {g: any(float(advantages[p]) != 0.0 for p in positions) for g, positions in members.items()}
    candidates = [g for g in members if with_signal[g]] if drop_zero else list(members)
    kept = tuple(candidates[:target_groups])
    fill = [g for g in members if not with_signal[g]][: max(target_groups - len(kept), 0)] if drop_zero else []
    return GroupSelection(keep=tuple(p for g in kept for p in members[g]), kept_groups=kept,
                          sampled_groups=len(members), zero_groups=sum(not s for s in with_signal.values()),
                          target_groups=target_groups, filler=tuple(p for g in fill for p in members[g]))


def filled_batch_scale(selection: GroupSelection, lengths: Sequence[int]) -> tuple[float, float]:
    """(tokens, sequences) multipliers of the loss's normaliser that count ``selection.filler`` as trained:
    ``lengths[i]`` is the number of loss tokens of input position ``i``. (1, 1) when the batch is full."""
    if not selection.filler or not selection.keep:
        return 1.0, 1.0
    tokens = sum(lengths[p] for p in selection.keep)
    return ((tokens + sum(lengths[p] for p in selection.filler)) / max(tokens, 1),
            (len(selection.keep) + len(selection.filler)) / len(selection.keep))


def minibatch_bounds(group_ids: Sequence[Hashable], groups_per_update: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of consecutive mini-batches of ``groups_per_update`` whole groups over responses
    listed group by group; the last mini-batch holds the remaining groups (it may have fewer)."""
    if groups_per_update < 1:
        raise ValueError(f"groups_per_update must be >= 1, got {groups_per_update}")
    bounds: list[tuple[int, int]] = []
    start, seen, previous = 0, 0, object()
    for position, group in enumerate(group_ids):
        if group != previous:
            if seen == groups_per_update:
                bounds.append((start, position))
                start, seen = position, 0
            seen += 1
            previous = group
    if len(group_ids):
        bounds.append((start, len(group_ids)))
    return bounds
