"""Held-out evaluation through a rollout engine: greedy accuracy, sampled pass@1, maj@k, pass@k.

The same ``\\boxed{}`` extraction and answer equivalence as training. ``generate`` is any function with the
``RolloutEngine.generate`` signature (an engine, or a Ray actor's method wrapped in ``ray.get``). The report
keeps one ``QuestionResult`` per item (extracted answers, correctness, scores), from which every metric
can be recomputed; ``mmupt eval`` (``mmupt_megatron/eval/``) writes them to its JSON report.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmupt_megatron.algorithms import AnswerMatcher, extract_answers
from mmupt_megatron.algorithms.metrics import score_question
from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.configured import image_encoder, open_dataset, prompt_for
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec

Generate = Callable[[Sequence[RolloutRequest], SamplingSpec], list[Rollout]]


@dataclass(frozen=True, kw_only=True)
class EvalItem:
    prompt: str
    images: Sequence[Any]
    answer: str
    category: str = "all"
    id: str = ""
    """Names the question in ``QuestionResult`` (default: its position in the items)."""


@dataclass(frozen=True, kw_only=True)
class QuestionResult:
    id: str
    category: str
    reference: str
    greedy_answer: str | None
    """Extracted from the greedy response (None: no ``\\boxed{}``)."""
    sampled_answers: list[str | None]
    """Extracted from each of the k sampled responses."""
    sampled_correct: list[bool]
    majority_answer: str | None
    scores: dict[str, float]
    """This question's row of the report: greedy, pass@1, pass@k, maj@k, majority_share, no_answer, ..."""


@dataclass
class EvalReport:
    num_questions: int
    k: int
    metrics: dict[str, float]
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    questions: list[QuestionResult] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {"questions": float(self.num_questions), **self.metrics}


def held_out_items(files: Sequence[str], data: DataConfig) -> list[EvalItem]:
    """Held-out items (prompt, fitted image, answer) from training-format rows (``data.eval_files``, the demo's
    test splits); a row without an answer is an error naming it."""
    holdout = open_dataset(files, data)
    encoder = image_encoder(data)
    items = []
    for index in range(len(holdout)):
        sample, image = holdout[index]
        if sample.answer is None:
            raise ValueError(f"{sample.origin}: evaluation rows need an answer ({data.answer_key!r})")
        items.append(EvalItem(prompt=prompt_for(sample.question, data), images=[encoder.fit(image)], answer=sample.answer))
    return items


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def evaluate(
    generate: Generate,
    items: Sequence[EvalItem],
    *,
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    matcher: AnswerMatcher | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Greedy (1 sample) and sampled (k samples) answers for every item, scored against its answer."""
    if not items:
        raise ValueError("nothing to evaluate: no items")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    matcher = matcher or AnswerMatcher()
    rows: list[dict[str, float]] = []
    categories: dict[str, list[dict[str, float]]] = defaultdict(list)
    questions: list[QuestionResult] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        requests = [RolloutRequest(group_id=i, prompt=item.prompt, images=item.images) for i, item in enumerate(chunk)]
        greedy = generate(requests, SamplingSpec(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed))
        sampled = generate(requests, SamplingSpec(n=k, temperature=temperature, top_p=top_p,
                                                  max_new_tokens=max_new_tokens, seed=seed + 1))
        greedy_answers = extract_answers([r.text for r in greedy])
        sampled_answers = extract_answers([r.text for r in sampled])
        for i, item in enumerate(chunk):
            answers = sampled_answers[i * k : (i + 1) * k]
            responses = sampled[i * k : (i + 1) * k]
            scored = score_question(answers, item.answer, matcher=matcher, k=k)
            row = scored.scores
            row["greedy"] = float(greedy_answers[i] is not None and matcher.equal(greedy_answers[i], item.answer))
            row["no_answer"] = sum(a is None for a in answers) / k
            row["response_length"] = sum(len(r.response_token_ids) for r in responses) / k
            rows.append(row)
            categories[item.category].append(row)
            questions.append(QuestionResult(
                id=item.id or str(start + i), category=item.category, reference=item.answer,
                greedy_answer=greedy_answers[i], sampled_answers=answers, sampled_correct=scored.correct,
                majority_answer=scored.majority_answer, scores=row,
            ))
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    by_category = {name: _mean(group) for name, group in sorted(categories.items())} if len(categories) > 1 else {}
    return EvalReport(num_questions=len(items), k=k, metrics=_mean(rows), by_category=by_category, questions=questions)
