"""The MM-UPT algorithm as pure functions: answers, equivalence, vote, advantages, loss, log-probs.

Nothing in this package imports megatron, vllm, ray, nemo_run or torch.distributed (tests/test_boundaries
checks it): group ids, global token counts and collective callbacks are arguments.
"""

from mmupt_megatron.algorithms.advantages import group_advantages
from mmupt_megatron.algorithms.answers import extract_answers, extract_boxed
from mmupt_megatron.algorithms.equivalence import AnswerMatcher, CanonicalAnswer, canonical_form
from mmupt_megatron.algorithms.logprobs import token_entropy, token_logprobs, vocab_parallel_token_logprobs
from mmupt_megatron.algorithms.loss import PolicyLossConfig, grpo_policy_loss, kl_penalty, truncated_is_weights
from mmupt_megatron.algorithms.vote import GroupVote, VoteResult, label_rewards, majority_vote

__all__ = [
    "AnswerMatcher",
    "CanonicalAnswer",
    "GroupVote",
    "PolicyLossConfig",
    "VoteResult",
    "canonical_form",
    "extract_answers",
    "extract_boxed",
    "group_advantages",
    "grpo_policy_loss",
    "kl_penalty",
    "label_rewards",
    "majority_vote",
    "token_entropy",
    "token_logprobs",
    "truncated_is_weights",
    "vocab_parallel_token_logprobs",
]
