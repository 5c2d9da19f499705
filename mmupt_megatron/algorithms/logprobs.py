"""Token log-probabilities from logits without materialising a full log-softmax.

``log p(target) = logit[target] - logsumexp(logits)`` is computed in chunks of tokens whose temporary
``exp`` buffer stays under a byte budget (64 MiB by default), so the extra memory is a small fraction of
the logits tensor instead of a second copy of it. The backward pass is hand-written
(``d logp / d logits = onehot(target) - softmax``) and recomputes the softmax chunk by chunk, so autograd
never stores a [tokens, vocab] intermediate either.

The vocab-parallel form takes the local vocabulary shard of each tensor-parallel rank plus two reduction
callbacks supplied by the caller (``all_reduce_max`` / ``all_reduce_sum`` over the TP group, each returning
the reduced tensor); nothing here knows about process groups. Its backward needs no communication: the
gradient with respect to the local shard only involves the (already global) logsumexp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
_DEFAULT_BUDGET_BYTES = 64 * 2**20


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _chunk_rows(num_rows: int, vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, min(num_rows, _DEFAULT_BUDGET_BYTES // (4 * vocab)))


def _raise_non_finite(lse_N: torch.Tensor, seq_len: int) -> None:
    """NaN or +inf anywhere in a row makes its logsumexp non-finite: name the samples it happened in."""
    bad_rows = torch.nonzero(~torch.isfinite(lse_N)).flatten()
    samples = sorted({int(r) // seq_len for r in bad_rows[:256]})
    raise ValueError(f"non-finite (NaN/inf) logits in sample(s) {samples[:8]} of the batch")


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """``chunk / temperature`` in float32, never written into ``chunk`` (``.float()`` of fp32 is the input itself;
    of bf16 a copy, divided in place: one chunk-sized buffer either way)."""
    out = chunk.float()
    if temperature == 1.0:
        return out
    return out / temperature if out is chunk else out.div_(temperature)


def check_temperature(temperature: float) -> float:
    """``temperature`` if it is a finite number > 0, else ValueError."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, targets_N, rows, vocab_start, all_reduce_max, all_reduce_sum, seq_len, temperature):
        num_rows, vocab = logits_NV.shape
        local_N = targets_N - vocab_start
        in_shard_N = (local_N >= 0) & (local_N < vocab)
        local_N = local_N.clamp(0, vocab - 1)
        logprob_N = torch.empty(num_rows, dtype=torch.float32, device=logits_NV.device)
        lse_N = torch.empty(num_rows, dtype=torch.float32, device=logits_NV.device)
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            chunk = _scaled(logits_NV[start:stop], temperature)
            max_C = all_reduce_max(chunk.max(dim=-1).values.clone())
            sumexp_C = all_reduce_sum((chunk - max_C[:, None]).exp_().sum(dim=-1))
            lse_C = max_C + sumexp_C.log()
            target_C = chunk.gather(1, local_N[start:stop, None]).squeeze(1)
            target_C = all_reduce_sum(torch.where(in_shard_N[start:stop], target_C, 0.0))
            lse_N[start:stop] = lse_C
            logprob_N[start:stop] = target_C - lse_C
        if seq_len and not bool(torch.isfinite(lse_N).all()):
            _raise_non_finite(lse_N, seq_len)
        ctx.save_for_backward(logits_NV, local_N, in_shard_N, lse_N)
        ctx.rows, ctx.temperature = rows, temperature
        return logprob_N

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, local_N, in_shard_N, lse_N = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        grad_N = grad_N.float()
        for start in range(0, logits_NV.shape[0], ctx.rows):
            stop = min(start + ctx.rows, logits_NV.shape[0])
            chunk = _scaled(logits_NV[start:stop], ctx.temperature)
            g_C = grad_N[start:stop] if ctx.temperature == 1.0 else grad_N[start:stop] / ctx.temperature
            block = (chunk - lse_N[start:stop, None]).exp_().mul_(-g_C[:, None])
            block.scatter_add_(1, local_N[start:stop, None], torch.where(in_shard_N[start:stop], g_C, 0.0)[:, None])
            grad_NV[start:stop] = block
        return grad_NV, None, None, None, None, None, None, None


def vocab_parallel_token_logprobs(
    local_logits_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    vocab_start: int,
    all_reduce_max: Reduce,
    all_reduce_sum: Reduce,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-prob (float32, shape of ``targets_BT``) of each target under the full-vocabulary softmax of
    ``logits / temperature``.

    ``local_logits_BTV`` holds vocabulary entries ``[vocab_start, vocab_start + V_local)``; the callbacks
    reduce a tensor over the ranks holding the other shards and return the result.
    """
    temperature = check_temperature(temperature)
    if local_logits_BTV.shape[:-1] != targets_BT.shape:
        raise ValueError(
            f"logits {tuple(local_logits_BTV.shape)} do not match targets {tuple(targets_BT.shape)}"
        )
    vocab = local_logits_BTV.shape[-1]
    logits_NV = local_logits_BTV.reshape(-1, vocab)
    rows = _chunk_rows(logits_NV.shape[0], vocab, chunk_tokens)
    seq_len = (targets_BT.shape[-1] if targets_BT.ndim > 1 else logits_NV.shape[0]) if check_finite else 0
    logprob_N = _TokenLogprob.apply(
        logits_NV, targets_BT.reshape(-1).long(), rows, vocab_start, all_reduce_max, all_reduce_sum, seq_len,
        temperature,
    )
    return logprob_N.view(targets_BT.shape)


def token_logprobs(
    logits_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log_softmax(logits / temperature).gather(targets)`` in float32, chunked (see module docstring)."""
    return vocab_parallel_token_logprobs(
        logits_BTV,
        targets_BT,
        vocab_start=0,
        all_reduce_max=_identity,
        all_reduce_sum=_identity,
        chunk_tokens=chunk_tokens,
        check_finite=check_finite,
        temperature=temperature,
    )


@torch.no_grad()
def token_entropy(
    local_logits_BTV: torch.Tensor,
    *,
    all_reduce_max: Reduce = _identity,
    all_reduce_sum: Reduce = _identity,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Entropy (nats, float32) of each token's predictive distribution; vocab-parallel via the callbacks."""
    vocab = local_logits_BTV.shape[-1]
    logits_NV = local_logits_BTV.reshape(-1, vocab)
    rows = _chunk_rows(logits_NV.shape[0], vocab, chunk_tokens)
    entropy_N = torch.empty(logits_NV.shape[0], dtype=torch.float32, device=logits_NV.device)
    for start in range(0, logits_NV.shape[0], rows):
        chunk = logits_NV[start : start + rows].float()
        max_C = all_reduce_max(chunk.max(dim=-1).values.clone())
        shifted = chunk - max_C[:, None]
        exp_CV = shifted.exp()
        sumexp_C = all_reduce_sum(exp_CV.sum(dim=-1))
        weighted_C = all_reduce_sum((exp_CV * shifted).sum(dim=-1))
        # H = log Z - E[x - max] with Z = sum exp(x - max)
        entropy_N[start : start + rows] = sumexp_C.log() - weighted_C / sumexp_C
    return entropy_N.view(local_logits_BTV.shape[:-1])
