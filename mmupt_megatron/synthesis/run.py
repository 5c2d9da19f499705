"""New questions from the policy itself, through any rollout engine.

    result = synthesize(engine.generate, dataset.samples, synthesis=cfg.synthesis, data=cfg.data,
                        rollout=cfg.rollout, model_step=40, progress=print)

Stages, each in calls of ``synthesis.batch_size`` prompts (one progress line per call):

1. seed answers (in-context only, for the rows whose prompt should show the policy's majority answer, see
   ``choose_seed_answer``): ``answer_n`` answers per seed question with the training prompt, majority vote;
2. ``candidates_per_seed`` generations per seed row with ``synthesis.temperature / top_p / max_new_tokens``;
   each is parsed and screened (``screen_question``); a generation that never closes its question is
   counted as ``unclosed``, never raised;
3. near-duplicate removal among the survivors, per image (``synthesis.dedup_scope=image``: same image
   bytes or path) or across the whole set, keeping the earliest in (seed row, candidate) order;
4. with ``answer_n > 0``: ``answer_n`` answers per surviving question, sampled exactly as training samples
   (the training prompt with ``data.instruction``, ``rollout.temperature / top_p / max_new_tokens``);
   ``unanswerable`` and ``agreement_band`` filters on those answers.

Request i of a stage is sampled with ``seed + stage offset + i``, so a result does not depend on
``batch_size``. ``generate`` has ``RolloutEngine.generate``'s signature (an engine's method, or a Ray
actor's wrapped in ``ray.get``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmupt_megatron.algorithms import AnswerMatcher, extract_answers, majority_vote
from mmupt_megatron.algorithms.synthesis import (
    REASONS,
    QuestionLimits,
    answer_verdict,
    choose_seed_answer,
    count_reasons,
    near_duplicates,
    screen_question,
    synthesis_prompt,
)
from mmupt_megatron.config import DataConfig, RolloutConfig, SynthesisConfig
from mmupt_megatron.data.configured import image_encoder, prompt_for
from mmupt_megatron.data.dataset import Sample
from mmupt_megatron.data.images import load_image
from mmupt_megatron.data.prompts import build_prompt
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.eval.limits import check_context, engine_limits

Generate = Callable[[Sequence[RolloutRequest], SamplingSpec], list[Rollout]]
Progress = Callable[[str], None]
_SEED_ANSWER_OFFSET = 2_000_003
_ANSWER_OFFSET = 1_000_003
_MAX_EXAMPLES = 3


def engine_context(model_dir: str | Path, *, rollout: RolloutConfig, synthesis: SynthesisConfig) -> int:
    """The max_model_len of a synthesis engine on ``model_dir``: the longer of the answer prompts (``rollout.*``)
    and the synthesis prompts (``synthesis.*``), each checked against the model's context as ``mmupt eval`` does
    (``eval.limits``), before any engine starts; ValueError naming every key to lower."""
    limits = engine_limits(model_dir)
    lengths, problems = [], []
    for section, budget in (("synthesis", synthesis), ("rollout", rollout)):
        try:
            lengths.append(check_context(limits, max_prompt_length=budget.max_prompt_length,
                                         max_new_tokens=budget.max_new_tokens, model=model_dir, section=section))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    return max(lengths)


@dataclass(frozen=True, kw_only=True)
class SynthesizedQuestion:
    id: str
    question: str
    seed_index: int
    """Position of the seed row in the ``seeds`` given to ``synthesize``."""
    source_id: str
    mode: str
    model_step: int | None
    majority_share: float | None
    """Majority share of the policy's answers to the new question (None without answering)."""
    majority_answer: str | None
    """The policy's majority answer (diagnostics only: never written as the row's answer)."""
    seed_answer_source: str | None
    """in-context: which answer the prompt showed (data, majority, none); None for direct."""


@dataclass(kw_only=True)
class SynthesisResult:
    mode: str
    model_step: int | None
    num_seeds: int
    questions: list[SynthesizedQuestion]
    counts: dict[str, int]
    """candidates, kept, and one count per rejection reason."""
    seed_answer_sources: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few rejected generations (or questions) per reason."""
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "model_step": self.model_step, "num_seeds": self.num_seeds,
                "counts": self.counts, "seed_answer_sources": self.seed_answer_sources,
                "seconds": round(self.seconds, 2), "examples": self.examples}

    def describe(self) -> str:
        c = self.counts
        rejected = ", ".join(f"{reason} {c[reason]}" for reason in REASONS if c[reason]) or "none"
        step = "unknown" if self.model_step is None else self.model_step
        shown = ", ".join(f"{source} {n}" for source, n in self.seed_answer_sources.items())
        return (f"synthesized {c['kept']} of {c['candidates']} candidate questions from {self.num_seeds} seed rows "
                f"({self.mode}, model step {step}, {self.seconds:.1f} s); rejected: {rejected}"
                + (f"; seed answers shown: {shown}" if shown else ""))


def image_group(sample: Sample) -> str:
    """A key that is equal for rows showing the same image (its bytes' hash, or its resolved path)."""
    source = sample.image_source
    if isinstance(source, bytes | bytearray):
        return "sha1:" + hashlib.sha1(source).hexdigest()
    return "path:" + str(Path(source).resolve())


class _Images:
    """Fitted seed images, decoded on demand and kept for the current call only."""

    def __init__(self, seeds: Sequence[Sample], data: DataConfig):
        self.seeds, self.data, self.encoder = seeds, data, image_encoder(data)

    def fitted(self, index: int):
        sample = self.seeds[index]
        try:
            image = load_image(sample.image_source, max_decode_pixels=self.data.max_decode_pixels)
        except ValueError as error:
            raise ValueError(f"{sample.origin}: {error}") from error
        return self.encoder.fit(image)


def _sample(
    generate: Generate, prompts: Sequence[tuple[str, int]], images: _Images, *, n: int, temperature: float,
    top_p: float, max_new_tokens: int, seed: int, batch_size: int, progress: Progress | None, stage: str,
) -> list[list[Rollout]]:
    """``n`` rollouts for each (prompt, seed index), in calls of ``batch_size`` prompts."""
    out: list[list[Rollout]] = []
    start_time = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        requests = [RolloutRequest(group_id=start + i, prompt=p, images=[images.fitted(s)]) for i, (p, s) in enumerate(chunk)]
        spec = SamplingSpec(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + start)
        per_request: list[list[Rollout]] = [[] for _ in chunk]
        for rollout in generate(requests, spec):
            per_request[rollout.prompt_index].append(rollout)
        out.extend(per_request)
        if progress is not None:
            progress(f"synthesize: {stage} {min(start + batch_size, len(prompts))}/{len(prompts)} "
                     f"({time.perf_counter() - start_time:.1f} s)")
    return out


def _vote(rollouts: list[list[Rollout]], matcher: AnswerMatcher) -> list[tuple[int, float, str | None]]:
    """(answered count, majority share, majority answer) per prompt."""
    answers = extract_answers([r.text for group in rollouts for r in group])
    vote = majority_vote(answers, [i for i, group in enumerate(rollouts) for _ in group], matcher=matcher)
    groups = [vote.groups[i] for i in range(len(rollouts))]
    return [(g.num_responses - g.num_no_answer, g.majority_share, g.pseudo_label) for g in groups]


def synthesize(
    generate: Generate,
    seeds: Sequence[Sample],
    *,
    synthesis: SynthesisConfig,
    data: DataConfig,
    rollout: RolloutConfig,
    indices: Sequence[int] | None = None,
    model_step: int | None = None,
    seed: int | None = None,
    matcher: AnswerMatcher | None = None,
    progress: Progress | None = None,
) -> SynthesisResult:
    """New questions about the images of ``seeds[indices]`` (all rows by default); see the module docstring."""
    started = time.perf_counter()
    s = synthesis
    problems = s.problems()
    if problems:
        raise ValueError("invalid synthesis settings: " + "; ".join(problems))
    indices = list(range(len(seeds))) if indices is None else list(indices)
    if not indices:
        raise ValueError("nothing to synthesize from: no seed rows")
    base_seed = s.seed if seed is None else seed
    matcher = matcher or AnswerMatcher()
    images = _Images(seeds, data)
    sampled = {"temperature": rollout.temperature, "top_p": rollout.top_p, "max_new_tokens": rollout.max_new_tokens,
               "batch_size": s.batch_size, "progress": progress}  # answers are sampled as training samples them

    # 1. which answer each in-context prompt shows
    shown: dict[int, tuple[str | None, str | None]] = {i: (None, None) for i in indices}
    if s.mode == "in-context":
        wants_vote = [i for i in indices if s.answer_n >= 2 and (
            s.seed_answer == "majority" or (s.seed_answer == "auto" and not (seeds[i].answer or "").strip()))]
        majority: dict[int, str | None] = {}
        if wants_vote:
            votes = _vote(_sample(generate, [(prompt_for(seeds[i].question, data), i) for i in wants_vote], images,
                                  n=s.answer_n, seed=base_seed + _SEED_ANSWER_OFFSET, stage="seed answers", **sampled),
                          matcher)
            majority = {i: label for i, (_, _, label) in zip(wants_vote, votes, strict=True)}
        for i in indices:
            shown[i] = choose_seed_answer(s.seed_answer, data_answer=seeds[i].answer, majority_answer=majority.get(i))

    # 2. candidate questions, parsed and screened
    prompts = [
        (build_prompt(synthesis_prompt(s.mode, seed_question=seeds[i].question, seed_answer=shown[i][0],
                                       template=s.in_context_template if s.mode == "in-context" else s.direct_template),
                      instruction="", system=data.system_prompt, image_first=data.image_first), i)
        for i in indices
    ]
    generations = _sample(generate, prompts, images, n=s.candidates_per_seed, temperature=s.temperature,
                          top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=base_seed,
                          batch_size=s.batch_size, progress=progress, stage="questions")
    limits = QuestionLimits(min_words=s.min_words, max_words=s.max_words, max_chars=s.max_chars,
                            repeat_threshold=s.repeat_threshold)
    candidates: list[dict[str, Any]] = []
    for i, group in zip(indices, generations, strict=True):
        seed_question = seeds[i].question
        for k, r in enumerate(sorted(group, key=lambda r: r.sample_index)):
            question, reason = screen_question(r.text, seed_question=seed_question, limits=limits)
            candidates.append({"seed": i, "k": k, "text": r.text, "question": question, "reason": reason})

    # 3. near-duplicates among the survivors
    alive = [c for c in candidates if c["reason"] is None]
    groups: list[Hashable] = [image_group(seeds[c["seed"]]) if s.dedup_scope == "image" else None for c in alive]
    for c, duplicate_of in zip(alive, near_duplicates([c["question"] for c in alive], threshold=s.dedup_threshold,
                                                      groups=groups), strict=True):
        if duplicate_of is not None:
            c["reason"] = "near_duplicate"

    # 4. answers to the survivors
    alive = [c for c in candidates if c["reason"] is None]
    verdicts: list[tuple[int, float, str | None] | None] = [None] * len(alive)
    if s.answer_n and alive:
        rollouts = _sample(generate, [(prompt_for(c["question"], data), c["seed"]) for c in alive], images,
                           n=s.answer_n, seed=base_seed + _ANSWER_OFFSET, stage="answers", **sampled)
        verdicts = _vote(rollouts, matcher)  # type: ignore[assignment]
        for c, (answered, share, _) in zip(alive, verdicts, strict=True):
            c["reason"] = answer_verdict(num_samples=s.answer_n, num_answered=answered, majority_share=share,
                                         min_answered=s.min_answered, band=(s.agreement_low, s.agreement_high))

    questions = []
    for c, verdict in zip(alive, verdicts, strict=True):
        if c["reason"] is not None:
            continue
        sample = seeds[c["seed"]]
        suffix = "" if model_step is None else f"@{model_step}"
        questions.append(SynthesizedQuestion(
            id=f"{sample.id}#{s.mode}-{c['k']}{suffix}", question=c["question"], seed_index=c["seed"],
            source_id=sample.id, mode=s.mode, model_step=model_step,
            majority_share=None if verdict is None else verdict[1],
            majority_answer=None if verdict is None else verdict[2],
            seed_answer_source=shown[c["seed"]][1],
        ))
    examples: dict[str, list[str]] = {}
    for c in candidates:
        if c["reason"] is not None and len(examples.setdefault(c["reason"], [])) < _MAX_EXAMPLES:
            examples[c["reason"]].append(c["question"] or c["text"])
    sources = Counter(source for _, source in shown.values() if source is not None)
    return SynthesisResult(
        mode=s.mode, model_step=model_step, num_seeds=len(indices), questions=questions,
        counts=count_reasons(c["reason"] for c in candidates), seed_answer_sources=dict(sorted(sources.items())),
        examples=examples, seconds=time.perf_counter() - started,
    )


__all__ = ["Generate", "SynthesisResult", "SynthesizedQuestion", "image_group", "synthesize"]
