import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmupt_megatron.algorithms import token_entropy, token_logprobs


def reference(logits, targets):
    return logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 9), st.integers(2, 50), st.one_of(st.none(), st.integers(1, 7)), st.integers(0, 99)
)
def test_chunked_equals_log_softmax_gather(batch, seq, vocab, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 5).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    ours = token_logprobs(logits, targets, chunk_tokens=chunk)
    ref = reference(logits, targets)
    assert torch.allclose(ours, ref, atol=1e-5)
    weights = torch.randn(batch, seq, generator=gen)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_bf16_logits_give_fp32_logprobs():
    logits = torch.randn(2, 3, 17).to(torch.bfloat16)
    targets = torch.randint(0, 17, (2, 3))
    out = token_logprobs(logits, targets)
    assert out.dtype == torch.float32
    assert torch.allclose(out, reference(logits, targets), atol=1e-5)


def test_entropy_matches_definition():
    logits = torch.randn(2, 4, 33) * 3
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(token_entropy(logits, chunk_tokens=3), expected, atol=1e-5)


def test_nan_logits_name_the_sample():
    logits = torch.randn(3, 4, 10)
    logits[2, 1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\]"):
        token_logprobs(logits, torch.zeros(3, 4, dtype=torch.long))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match targets"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_tempered_logprobs_are_those_of_logits_over_temperature(temperature):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 23, generator=gen) * 4).requires_grad_()
    targets = torch.randint(0, 23, (2, 5), generator=gen)
    ours = token_logprobs(logits, targets, chunk_tokens=3, temperature=temperature)
    ref = reference(logits / temperature, targets)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours - reference(logits, targets)).abs().max() > 0.1  # the temperature does change them
    weights = torch.randn(2, 5, generator=gen)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_is_an_error(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), temperature=temperature)


def test_tempered_bf16_logits_are_left_as_they_are():
    logits = (torch.randn(2, 3, 17) * 3).to(torch.bfloat16)
    before = logits.clone()
    targets = torch.randint(0, 17, (2, 3))
    out = token_logprobs(logits, targets, temperature=0.5)
    assert torch.equal(logits, before)
    assert torch.allclose(out, reference(logits.float() / 0.5, targets), atol=1e-5)
