"""DP-sharded GRPO loss gives the full-batch gradient; vocab-parallel log-probs equal the full-vocab ones."""

import pytest
import torch
import torch.distributed as dist

from mmupt_megatron.algorithms import (
    PolicyLossConfig,
    grpo_policy_loss,
    token_logprobs,
    vocab_parallel_token_logprobs,
)
from mmupt_megatron.distributed.parallel import run_workers

pytestmark = pytest.mark.distributed
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def make_batch(seed=0, batch=6, seq=5, vocab=13, hidden=8):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen)
    hidden_states = torch.randn(batch, seq, hidden, generator=gen)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    old = torch.randn(batch, seq, generator=gen) * 0.1 - 2.5
    ref = torch.randn(batch, seq, generator=gen) * 0.1 - 2.5
    adv = torch.randn(batch, generator=gen)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).float()
    return weight, hidden_states, targets, old, ref, adv, mask


def loss_and_grad(weight, hidden_states, targets, old, ref, adv, mask, agg, num_tokens, num_seqs):
    weight = weight.clone().requires_grad_()
    logp = token_logprobs(hidden_states @ weight.T, targets)
    cfg = PolicyLossConfig(loss_agg=agg, norm_length=5, kl_coef=0.1)
    loss, _ = grpo_policy_loss(
        logp, old, adv, mask, cfg=cfg, global_num_tokens=num_tokens, global_num_seqs=num_seqs, ref_logprobs_BT=ref
    )
    loss.backward()
    return loss.detach(), weight.grad


def _dp_worker():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    weight, h, t, old, ref, adv, mask = make_batch()
    shard = slice(rank * 3, rank * 3 + 3)
    out = {}
    for agg in AGGS:
        # global counts are the caller's business: here an all-reduce of the local counts
        counts = torch.tensor([mask[shard].sum(), float(mask[shard].shape[0])])
        dist.all_reduce(counts)
        loss, grad = loss_and_grad(
            weight, h[shard], t[shard], old[shard], ref[shard], adv[shard], mask[shard], agg, int(counts[0]), int(counts[1])
        )
        dist.all_reduce(loss)
        dist.all_reduce(grad)
        out[agg] = (loss, grad)
    return out


def test_dp_sharded_gradient_equals_full_batch():
    results = run_workers(_dp_worker, world_size=2)
    weight, h, t, old, ref, adv, mask = make_batch()
    for agg in AGGS:
        loss, grad = loss_and_grad(weight, h, t, old, ref, adv, mask, agg, int(mask.sum()), mask.shape[0])
        for rank_result in results:
            assert torch.allclose(rank_result[agg][0], loss, atol=1e-6, rtol=1e-5), agg
            assert torch.allclose(rank_result[agg][1], grad, atol=1e-6, rtol=1e-5), agg
        assert grad.abs().sum() > 0


def _tp_worker(temperature: float = 1.0):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 10, generator=gen) * 4
    targets = torch.randint(0, 10, (2, 4), generator=gen)
    local = logits[..., rank * 5 : rank * 5 + 5].clone().requires_grad_()

    def all_reduce(op):
        def reduce(tensor):
            dist.all_reduce(tensor, op=op)
            return tensor

        return reduce

    logp = vocab_parallel_token_logprobs(
        local,
        targets,
        vocab_start=rank * 5,
        all_reduce_max=all_reduce(dist.ReduceOp.MAX),
        all_reduce_sum=all_reduce(dist.ReduceOp.SUM),
        chunk_tokens=3,
        temperature=temperature,
    )
    logp.sum().backward()
    return logp.detach(), local.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_parallel_logprobs_equal_full_vocab(temperature):
    (logp0, grad0), (logp1, grad1) = run_workers(_tp_worker, world_size=2, args=(temperature,))
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 4, 10, generator=gen) * 4).requires_grad_()
    targets = torch.randint(0, 10, (2, 4), generator=gen)
    full = (logits / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    full.sum().backward()
    assert torch.allclose(logp0, full.detach(), atol=1e-5) and torch.allclose(logp1, full.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([grad0, grad1], dim=-1), logits.grad, atol=1e-5)
