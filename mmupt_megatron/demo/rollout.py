"""Sampling and evaluation of the demo model with plain transformers (no vLLM): greedy and sampled
accuracy, maj@k, and format rate on held-out world examples, through the project's one evaluator
(``evaluate`` in the evaluation module) with the transformers model behind the ``RolloutEngine.generate``
interface (``HFEngine``).

Accuracy compares the extracted ``\\boxed{}`` answer with the held-out label (evaluation only).
"sampled" is the mean accuracy over k samples per question at temperature 1; "maj@k" is the accuracy of
the majority answer of those k samples (the pseudo-label MM-UPT would train towards: ``majority_vote``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.data.prompts import build_prompt
from mmupt_megatron.data.synthetic import Example
from mmupt_megatron.demo.model import PromptStyle, encode_prompts
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.eval.evaluator import EvalItem
from mmupt_megatron.eval.evaluator import evaluate as evaluate_items


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


class HFEngine:
    """``RolloutEngine.generate`` over a transformers model: every request's ``n`` samples in one batch (prompts
    repeated), greedy at temperature 0; sampling draws from torch's global generator (``spec.seed`` unused)."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, encoder: ImageEncoder) -> None:
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder

    def generate(self, requests: Sequence[RolloutRequest], spec: SamplingSpec) -> list[Rollout]:
        rows = [(index, request) for index, request in enumerate(requests) for _ in range(spec.n)]
        batch = encode_prompts(self.tokenizer, prompts=[r.prompt for _, r in rows],
                               images=[image for _, r in rows for image in r.images], encoder=self.encoder)
        responses = generate_responses(self.model, self.tokenizer, batch, do_sample=spec.temperature > 0,
                                       temperature=spec.temperature or 1.0, max_new_tokens=spec.max_new_tokens)
        return [
            Rollout(group_id=request.group_id, prompt_index=index, sample_index=i % spec.n, prompt_token_ids=[],
                    response_token_ids=ids, response_logprobs=[], text=text,
                    finish_reason="stop" if ids and ids[-1] == self.tokenizer.eos_token_id else "length")
            for i, ((index, request), ids, text) in enumerate(zip(rows, responses, decode(self.tokenizer, responses),
                                                                   strict=True))
        ]


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
    temperature: float = 1.0,
) -> EvalResult:
    """Greedy, sampled (at ``temperature``) and maj@``num_samples`` accuracy of a transformers model on world
    examples: the project's evaluator (training's extraction, equivalence and vote) with ``HFEngine``."""
    items = [EvalItem(prompt=build_prompt(e.question, instruction=style.instruction, system=style.system,
                                          image_first=style.image_first),
                      images=[e.image], answer=e.answer, category=e.kind, id=e.id) for e in examples]
    report = evaluate_items(HFEngine(model, tokenizer, encoder=encoder).generate, items, k=num_samples,
                            temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    m = report.metrics
    by_kind = {kind: row["greedy"] for kind, row in report.by_category.items()} or {examples[0].kind: m["greedy"]}
    return EvalResult(greedy=m["greedy"], sampled=m["pass@1"], maj=m.get(f"maj@{num_samples}", m["pass@1"]),
                      format_rate=1.0 - m["no_answer"], by_kind=by_kind)
