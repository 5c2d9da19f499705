"""Data-parallel rollout: one batch of prompt groups over N engines, results back in request order.

Each engine gets a contiguous run of requests (whole prompt groups: all ``n`` samples of a prompt stay on one
engine), the runs balanced by expected tokens. An engine samples request i of its run with seed ``seed + i``
(``SamplingSpec``); giving it ``seed + start`` makes every request's seed its position in the whole batch, so
**the responses do not depend on the number of engines** (nor on how the batch was split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec

IMAGE_TOKENS_GUESS = 256
"""Expected prompt tokens per image when only the request is known (balance, not correctness, depends on it)."""


def expected_tokens(request: RolloutRequest, spec: SamplingSpec) -> int:
    """A cost estimate: prompt tokens (characters / 4, plus images) once, then ``n`` responses."""
    return len(request.prompt) // 4 + IMAGE_TOKENS_GUESS * len(request.images) + spec.n * spec.max_new_tokens


def split_contiguous(costs: Sequence[int], parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``costs`` (some may be empty when there are fewer items than parts),
    cut where the running total first reaches each part's share of the total: every part holds at most its
    share plus one item's cost. Deterministic."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    total = sum(costs)
    cuts, running, start = [], 0, 0
    for index, cost in enumerate(costs):
        running += cost
        if len(cuts) < parts - 1 and running * parts >= total * (len(cuts) + 1):
            cuts.append(range(start, index + 1))
            start = index + 1
    cuts.append(range(start, len(costs)))
    cuts.extend(range(len(costs), len(costs)) for _ in range(parts - len(cuts)))
    return cuts


def dispatch(requests: Sequence[RolloutRequest], spec: SamplingSpec, num_engines: int
             ) -> list[tuple[range, list[RolloutRequest], SamplingSpec]]:
    """Per engine: (its request positions, its requests, its sampling spec with the seed of its first one)."""
    runs = split_contiguous([expected_tokens(r, spec) for r in requests], num_engines)
    return [(run, list(requests[run.start : run.stop]), replace(spec, seed=spec.seed + run.start)) for run in runs]


def merge(parts: Sequence[tuple[range, list[Rollout]]]) -> list[Rollout]:
    """The engines' rollouts in request order, ``prompt_index`` counted in the whole batch."""
    out: list[Rollout] = []
    for run, rollouts in sorted(parts, key=lambda part: part[0].start):
        out.extend(replace(r, prompt_index=run.start + r.prompt_index) for r in rollouts)
    return out
