"""Sampling and evaluation of the demo model with plain transformers (no vLLM): greedy and sampled
accuracy, maj@k, and format rate on held-out world examples.

Accuracy compares the extracted ``\\boxed{}`` answer with the held-out label (evaluation only).
"sampled" is the mean accuracy over k samples per question at temperature 1; "maj@k" is the accuracy of
the majority answer of those k samples (the pseudo-label MM-UPT would train towards).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from mmupt_megatron.algorithms import extract_boxed
from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.synthetic import Example
from mmupt_megatron.demo.model import PromptStyle, encode_batch


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, torch.Tensor],
    *,
    do_sample: bool,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
) -> list[list[int]]:
    """Response token ids per row (eos included when produced, padding dropped)."""
    was_training = model.training
    model.eval()
    # A response may not contain vision placeholders or turn markers (they would break a teacher-forced
    # forward of prompt + response): only <|im_end|> among the special tokens can be sampled.
    suppress = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "suppress_tokens": suppress}
    if do_sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs)
    model.train(was_training)
    width = batch["input_ids"].shape[1]
    responses = []
    for row in out[:, width:].tolist():
        ids: list[int] = []
        for token in row:
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
        while ids and ids[-1] == tokenizer.pad_token_id:
            ids.pop()
        responses.append(ids)
    return responses


def decode(tokenizer: PreTrainedTokenizerBase, responses: list[list[int]]) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True) for r in responses]


@dataclass
class EvalResult:
    greedy: float
    sampled: float
    maj: float
    format_rate: float
    """Fraction of sampled responses with an extractable answer."""
    by_kind: dict[str, float] = field(default_factory=dict)
    """Greedy accuracy per question kind."""

    def row(self) -> str:
        kinds = " ".join(f"{k}={v:.2f}" for k, v in sorted(self.by_kind.items()))
        return f"greedy {self.greedy:.3f} sampled {self.sampled:.3f} maj {self.maj:.3f} format {self.format_rate:.2f} [{kinds}]"


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    encoder: ImageEncoder,
    style: PromptStyle,
    num_samples: int = 8,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> EvalResult:
    greedy_hits, sampled_hits, maj_hits, answered = 0, 0, 0, 0
    kind_hits: Counter[str] = Counter()
    kind_total: Counter[str] = Counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = encode_batch(tokenizer, questions=[e.question for e in chunk], images=[e.image for e in chunk],
                             encoder=encoder, style=style)
        greedy = [extract_boxed(t) for t in decode(tokenizer, generate_responses(
            model, tokenizer, batch, do_sample=False, max_new_tokens=max_new_tokens))]
        many = encode_batch(tokenizer, questions=[e.question for e in chunk for _ in range(num_samples)],
                            images=[e.image for e in chunk for _ in range(num_samples)], encoder=encoder, style=style)
        sampled = [extract_boxed(t) for t in decode(tokenizer, generate_responses(
            model, tokenizer, many, do_sample=True, max_new_tokens=max_new_tokens))]
        for i, example in enumerate(chunk):
            hit = greedy[i] == example.answer
            greedy_hits += hit
            kind_hits[example.kind] += hit
            kind_total[example.kind] += 1
            answers = sampled[i * num_samples : (i + 1) * num_samples]
            sampled_hits += sum(a == example.answer for a in answers)
            answered += sum(a is not None for a in answers)
            votes = Counter(a for a in answers if a is not None)
            if votes:
                top = max(votes.values())
                winner = min(a for a, n in votes.items() if n == top)
                maj_hits += winner == example.answer
    n = len(examples)
    return EvalResult(
        greedy=greedy_hits / n,
        sampled=sampled_hits / (n * num_samples),
        maj=maj_hits / n,
        format_rate=answered / (n * num_samples),
        by_kind={k: kind_hits[k] / kind_total[k] for k in kind_total},
    )
