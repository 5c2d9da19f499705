"""The ``synthesis`` section of the run configuration (``mmupt synthesize`` and online question refresh while
training): how questions are generated, filtered and answered. Part of ``config.Config``; kept in its own
module because it is the one section only the synthesis layer reads."""

from __future__ import annotations

from dataclasses import dataclass

from mmupt_megatron.algorithms.synthesis import MODES as SYNTHESIS_MODES
from mmupt_megatron.algorithms.synthesis import SEED_ANSWER_POLICIES


@dataclass(kw_only=True)
class SynthesisConfig:
    mode: str = "in-context"
    """in-context (show a seed question and its answer, ask for a different one) or direct (image only)."""
    candidates_per_seed: int = 2
    """Questions generated per seed row (before filtering)."""
    temperature: float = 1.0
    """Sampling temperature of question generation (answers use rollout.temperature / top_p)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of question generation."""
    max_new_tokens: int = 256
    """Token budget of one generated question; one that does not close its tag in time is 'unclosed'."""
    max_prompt_length: int = 2048
    """Token budget of a synthesis prompt (template, seed question, image tokens); sizes the engine."""
    seed: int = 0
    """Sampling seed (request i of a stage is sampled with seed + i: results do not depend on batching)."""
    in_context_template: str = ""
    """Replaces the built-in in-context prompt; {question} / {answer} become the seed's; empty = built-in."""
    direct_template: str = ""
    """Replaces the built-in direct prompt; empty = built-in."""
    seed_answer: str = "auto"
    """Answer the in-context prompt shows: auto (data's, else the policy's majority answer), data, majority, none."""
    min_words: int = 3
    """Questions with fewer words are rejected (too_short)."""
    max_words: int = 80
    """Questions with more words are rejected (too_long)."""
    max_chars: int = 600
    """Questions with more characters are rejected (too_long)."""
    repeat_threshold: float = 0.8
    """Word-bigram Jaccard similarity to the seed question at or above which a question repeats it."""
    dedup_threshold: float = 0.8
    """Word-bigram Jaccard similarity at or above which a question duplicates an earlier kept one."""
    dedup_scope: str = "image"
    """image: near-duplicates are removed among questions about the same image; global: across the set."""
    answer_n: int = 8
    """Answers sampled per new question (and per seed question for majority seed answers); 0 = no answering
    (then neither the unanswerable nor the agreement filter runs)."""
    min_answered: float = 0.5
    """Share of those answers that must contain a boxed answer, else the question is unanswerable."""
    agreement_low: float = 0.0
    """Questions whose majority share is below this are dropped (too split: noise)."""
    agreement_high: float = 1.0
    """Questions whose majority share is above this are dropped (too easy: no signal); 1.0 keeps all."""
    model_step: int | None = None
    """Training steps the model had taken, recorded with the output when its folder records none; null = unknown."""
    batch_size: int = 64
    """Seed rows (or questions to answer) per generation call; progress is printed per call."""
    max_seeds: int = 0
    """Use only the first this many seed rows of the input (0 = all)."""
    refresh_every: int = 0
    """Online synthesis while training: every this many steps refresh part of the pool; 0 = off."""
    refresh_fraction: float = 0.25
    """Share of the training pool replaced by new synthesized questions at each refresh."""

    def problems(self) -> list[str]:
        out = []
        if self.mode not in SYNTHESIS_MODES:
            out.append(f"synthesis.mode must be one of {SYNTHESIS_MODES}, got {self.mode!r}")
        if self.seed_answer not in SEED_ANSWER_POLICIES:
            out.append(f"synthesis.seed_answer must be one of {SEED_ANSWER_POLICIES}, got {self.seed_answer!r}")
        if self.dedup_scope not in ("image", "global"):
            out.append(f"synthesis.dedup_scope must be image or global, got {self.dedup_scope!r}")
        if self.max_seeds < 0:
            out.append(f"synthesis.max_seeds must be >= 0 (0 = all rows), got {self.max_seeds}")
        for name in ("candidates_per_seed", "max_new_tokens", "max_prompt_length", "max_chars", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"synthesis.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            out.append(f"synthesis.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"synthesis.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_words <= self.max_words:
            out.append(f"synthesis needs 0 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        for name in ("repeat_threshold", "dedup_threshold"):
            if not 0 < getattr(self, name) <= 1:
                out.append(f"synthesis.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.answer_n == 1 or self.answer_n < 0:
            out.append(f"synthesis.answer_n must be 0 (no answering) or >= 2 (majority voting), got {self.answer_n}")
        if not 0 <= self.min_answered <= 1:
            out.append(f"synthesis.min_answered must be in [0, 1], got {self.min_answered}")
        if not 0 <= self.agreement_low <= self.agreement_high <= 1:
            out.append(f"synthesis needs 0 <= agreement_low <= agreement_high <= 1, got {self.agreement_low} "
                       f"and {self.agreement_high}")
        if self.refresh_every < 0:
            out.append(f"synthesis.refresh_every must be >= 0, got {self.refresh_every}")
        if not 0 < self.refresh_fraction <= 1:
            out.append(f"synthesis.refresh_fraction must be in (0, 1], got {self.refresh_fraction}")
        if self.answer_n == 0 and (self.agreement_low > 0 or self.agreement_high < 1):
            out.append("synthesis.agreement_low/high need answers: set synthesis.answer_n >= 2")
        return out


__all__ = ["SynthesisConfig"]
