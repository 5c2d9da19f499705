"""Splitting a rollout batch over engines: contiguous whole groups, balanced by cost, seeds by batch position,
results back in request order."""

import pytest

from mmupt_megatron.engines.dispatch import dispatch, expected_tokens, merge, split_contiguous
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec


@pytest.mark.parametrize(("costs", "parts", "expected"), [
    ([1] * 8, 2, [range(0, 4), range(4, 8)]),
    ([10, 1, 1, 1], 2, [range(0, 1), range(1, 4)]),
    ([1, 1, 1], 1, [range(0, 3)]),
    ([5], 3, [range(0, 1), range(1, 1), range(1, 1)]),
    ([], 2, [range(0, 0), range(0, 0)]),
    ([3, 3, 3, 3, 3, 3], 3, [range(0, 2), range(2, 4), range(4, 6)]),
])
def test_split_is_contiguous_and_balanced(costs, parts, expected):
    runs = split_contiguous(costs, parts)
    assert runs == expected
    assert [i for run in runs for i in run] == list(range(len(costs)))  # covers every item once, in order
    if costs:
        share = sum(costs) / parts
        assert max(sum(costs[i] for i in run) for run in runs) <= share + max(costs)


def test_split_rejects_no_parts():
    with pytest.raises(ValueError, match="parts must be >= 1"):
        split_contiguous([1], 0)


def fake_engine(requests, spec):
    """An engine whose response names the request and the seed it was sampled with (seed + its position)."""
    return [Rollout(group_id=r.group_id, prompt_index=i, sample_index=s, prompt_token_ids=[], response_token_ids=[],
                    response_logprobs=[], text=f"{r.prompt}|seed {spec.seed + i}", finish_reason="stop")
            for i, r in enumerate(requests) for s in range(spec.n)]


@pytest.mark.parametrize("engines", [1, 2, 3, 7])
def test_responses_do_not_depend_on_the_number_of_engines(engines):
    requests = [RolloutRequest(group_id=f"g{i}", prompt="x" * (40 * (i % 3 + 1))) for i in range(7)]
    spec = SamplingSpec(n=2, seed=100, max_new_tokens=8)
    parts = [(run, fake_engine(chunk, sub)) for run, chunk, sub in dispatch(requests, spec, engines)]
    merged = merge(list(reversed(parts)))  # the order in which engines answer does not matter
    assert merged == fake_engine(requests, spec)
    assert [r.prompt_index for r in merged] == [i for i in range(7) for _ in range(2)]


def test_expected_tokens_counts_prompt_images_and_responses():
    spec = SamplingSpec(n=4, max_new_tokens=10)
    assert expected_tokens(RolloutRequest(group_id=0, prompt="abcd" * 5), spec) == 5 + 40
    assert expected_tokens(RolloutRequest(group_id=0, prompt="", images=[object()]), spec) == 256 + 40
