"""Self-synthesized questions (MM-UPT's in-context and direct synthesizing) as pure functions on strings.

Two ways to ask the policy for a new question about an image:
- ``in-context``: the prompt shows a seed question about the image and, when one is known, its answer, and
  asks for a different question about the same image;
- ``direct``: the prompt shows only the image.

The wording of both templates is ours. Which answer the in-context prompt shows is ``choose_seed_answer``'s
decision: the data's answer, else the policy's own majority answer to the seed question, else none (the
prompt then says only that the answer is not given); the choice is recorded per row.

**Output format.** The model must put the question between ``<question>`` and ``</question>`` (tags are
case-insensitive; the *last* opening tag counts, as the last ``\\boxed{}`` does for answers). A generation
without an opening tag is ``no_question``; one whose last opening tag never closes (it ran out of tokens, or
stopped mid-question) is ``unclosed``. Both are counted, never an exception.

**Filters**, applied in this order; each rejected candidate gets exactly one reason code (``REASONS``):

- ``no_question``, ``unclosed``, ``empty``: the parse above;
- ``special_tokens``: the question spells a chat/vision special token (``<|...|>``);
- ``tag_fragment``: the question holds a piece of the output format's tags (``< /``, ``<question``,
  ``question>``): the model botched a tag and the words around it are not a question. Measured on the demo
  (seed 1, in-context): 23 of 623 kept questions were such fragments (``How many shapes are < /``); the base
  answered them with chains shifted by the stray tag words, and MM-UPT on that set took "how many shapes"
  questions from greedy 1.00 to 0.49;
- ``too_short`` / ``too_long``: fewer than ``min_words`` words, or more than ``max_words`` words or
  ``max_chars`` characters (words = whitespace-separated pieces);
- ``repeats_seed``: the question's normalised tokens equal the seed question's, or their word-bigram
  Jaccard similarity is at least ``repeat_threshold``;
- ``near_duplicate``: word-bigram Jaccard similarity at least ``dedup_threshold`` with an earlier kept
  question of the same group (an image, or the whole set). The earliest in input order is kept, so the
  result depends only on the order of the input;
- ``unanswerable``: fewer than ``min_answered`` of the policy's answers to it contain a ``\\boxed{}``;
- ``agreement_band``: the majority share of those answers lies outside ``[low, high]`` (unanimous questions
  give GRPO no signal; very split ones give it noise).

Normalisation (for the two similarity filters): NFKC, lower case, tokens are runs of letters/digits and
single symbols other than sentence punctuation and brackets, so ``3+4`` and ``3*4`` stay different questions.
Near-duplicate search uses prefix filtering on a global rare-first token order (exact: the same result
as comparing every pair, in roughly linear time on real sets).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

MODES = ("in-context", "direct")
SEED_ANSWER_POLICIES = ("auto", "data", "majority", "none")
OPEN_TAG, CLOSE_TAG = "<question>", "</question>"
REASONS = (
    "no_question",
    "unclosed",
    "empty",
    "special_tokens",
    "tag_fragment",
    "too_short",
    "too_long",
    "repeats_seed",
    "near_duplicate",
    "unanswerable",
    "agreement_band",
)

IN_CONTEXT_TEMPLATE = (
    "Here is a question about this image{answer_note}.\n"
    "Question: {question}\n"
    "{answer_line}"
    "Ask a new question about the same image that is clearly different from this one, can be answered from "
    "the image alone, and has one short answer (a number, a word or an option letter). Do not answer it. "
    f"Write only the new question, between {OPEN_TAG} and {CLOSE_TAG}."
)
DIRECT_TEMPLATE = (
    "Look closely at this image. Ask one question about it that takes a few steps of reasoning and has one "
    "short answer (a number, a word or an option letter). Do not answer it. "
    f"Write only the question, between {OPEN_TAG} and {CLOSE_TAG}."
)

_OPEN = re.compile(r"<\s*question\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*question\s*>", re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[^<>|]*\|>")
_TAG_FRAGMENT = re.compile(r"<\s*/|<\s*question|question\s*>", re.IGNORECASE)
_TOKEN = re.compile(r"[^\W_]+|[^\w\s.,;:!?'\"`()\[\]]")
_SHINGLE_WORDS = 2


def synthesis_prompt(
    mode: str, *, seed_question: str | None = None, seed_answer: str | None = None, template: str = ""
) -> str:
    """The user-turn text asking for a new question (the image goes with it as a separate placeholder).

    ``template`` replaces the built-in one of ``mode``; ``{question}`` and ``{answer}`` in it are replaced by
    the seed question and answer (``unknown`` when there is none). Other braces are left alone.
    """
    if mode not in MODES:
        raise ValueError(f"synthesis mode must be one of {MODES}, got {mode!r}")
    if mode == "in-context" and not (seed_question or "").strip():
        raise ValueError("in-context synthesis needs the seed question")
    question = (seed_question or "").strip()
    if template:
        return template.replace("{question}", question).replace("{answer}", seed_answer or "unknown")
    if mode == "direct":
        return DIRECT_TEMPLATE
    if seed_answer is None:
        return IN_CONTEXT_TEMPLATE.format(answer_note=" (its answer is not given)", question=question, answer_line="")
    return IN_CONTEXT_TEMPLATE.format(answer_note=", with its answer", question=question,
                                      answer_line=f"Answer: {seed_answer.strip()}\n")


def choose_seed_answer(policy: str, *, data_answer: str | None, majority_answer: str | None) -> tuple[str | None, str]:
    """(answer the in-context prompt shows, where it came from: ``data``, ``majority`` or ``none``).

    ``auto``: the data's answer, else the policy's majority answer; ``data`` / ``majority``: only that one;
    ``none``: never show an answer.
    """
    if policy not in SEED_ANSWER_POLICIES:
        raise ValueError(f"seed answer policy must be one of {SEED_ANSWER_POLICIES}, got {policy!r}")
    if policy in ("auto", "data") and data_answer is not None and data_answer.strip():
        return data_answer.strip(), "data"
    if policy in ("auto", "majority") and majority_answer is not None:
        return majority_answer, "majority"
    return None, "none"


def parse_question(text: str) -> tuple[str | None, str | None]:
    """(question, None) or (None, reason) for one generation (see the module docstring's output format)."""
    if not isinstance(text, str):
        raise TypeError(f"generation must be a str, got {type(text).__name__}")
    opens = list(_OPEN.finditer(text))
    if not opens:
        return None, "no_question"
    close = _CLOSE.search(text, opens[-1].end())
    if close is None:
        return None, "unclosed"
    question = text[opens[-1].end() : close.start()].strip()
    return (question, None) if question else (None, "empty")


def question_tokens(text: str) -> list[str]:
    """Normalised tokens: NFKC, lower case, letter/digit runs and single non-punctuation symbols."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(tokens: Sequence[str], size: int = _SHINGLE_WORDS) -> frozenset[tuple[str, ...]]:
    """Word ``size``-grams of ``tokens`` (the whole token list when it is shorter; empty for no tokens)."""
    if not tokens:
        return frozenset()
    if len(tokens) <= size:
        return frozenset([tuple(tokens)])
    return frozenset(tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def similarity(a: str, b: str) -> float:
    """Word-bigram Jaccard similarity of two questions after normalisation (1.0 for equal token lists)."""
    tokens_a, tokens_b = question_tokens(a), question_tokens(b)
    if tokens_a == tokens_b:
        return 1.0
    return jaccard(shingles(tokens_a), shingles(tokens_b))


@dataclass(frozen=True, kw_only=True)
class QuestionLimits:
    """The per-question filters' settings (``synthesis.*`` in the config)."""

    min_words: int = 3
    max_words: int = 80
    max_chars: int = 600
    repeat_threshold: float = 0.8

    def __post_init__(self) -> None:
        if not 0 <= self.min_words <= self.max_words or self.max_chars < 1:
            raise ValueError(f"need 0 <= min_words <= max_words and max_chars >= 1, got {self.min_words}, "
                             f"{self.max_words}, {self.max_chars}")
        if not 0 < self.repeat_threshold <= 1:
            raise ValueError(f"repeat_threshold must be in (0, 1], got {self.repeat_threshold}")


def screen_question(text: str, *, seed_question: str | None, limits: QuestionLimits) -> tuple[str | None, str | None]:
    """Parse one generation and apply the per-question filters: (question, None) or (None, reason)."""
    question, reason = parse_question(text)
    if question is None:
        return None, reason
    if _SPECIAL.search(question):
        return None, "special_tokens"
    if _TAG_FRAGMENT.search(question):
        return None, "tag_fragment"
    num_words = len(question.split())
    if num_words < limits.min_words:
        return None, "too_short"
    if num_words > limits.max_words or len(question) > limits.max_chars:
        return None, "too_long"
    if seed_question and similarity(question, seed_question) >= limits.repeat_threshold:
        return None, "repeats_seed"
    return question, None


def near_duplicates(
    texts: Sequence[str], *, threshold: float, groups: Sequence[Hashable] | None = None
) -> list[int | None]:
    """For each text, None if kept, else the index of the earliest kept text of its group it near-duplicates
    (word-bigram Jaccard >= ``threshold``; texts without tokens duplicate each other). Greedy in input order.

    Exact prefix filtering: with shingles sorted rare-first, two sets of Jaccard >= t share a shingle within
    the first ``|s| - ceil(t |s|) + 1`` of each, so only kept texts indexed under one of those are compared.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if groups is not None and len(groups) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(groups)} groups")
    group_of = list(groups) if groups is not None else [None] * len(texts)
    sets = [shingles(question_tokens(t)) for t in texts]
    frequency = Counter(s for shingle_set in sets for s in shingle_set)
    blank: dict[Hashable, int] = {}  # the first kept text without any token, per group
    index: dict[tuple, list[int]] = defaultdict(list)
    out: list[int | None] = []
    for i, (shingle_set, group) in enumerate(zip(sets, group_of, strict=True)):
        if not shingle_set:
            out.append(blank.get(group))
            blank.setdefault(group, i)
            continue
        ordered = sorted(shingle_set, key=lambda s: (frequency[s], s))
        # floor (with a little slack for float error) can only lengthen the prefix: still exact
        prefix = ordered[: len(ordered) - math.floor(threshold * len(ordered) + 1e-9) + 1]
        candidates = sorted({j for s in prefix for j in index[(group, s)]})
        match = next((j for j in candidates if jaccard(shingle_set, sets[j]) >= threshold), None)
        out.append(match)
        if match is None:
            for s in prefix:
                index[(group, s)].append(i)
    return out


def answer_verdict(
    *, num_samples: int, num_answered: int, majority_share: float, min_answered: float,
    band: tuple[float, float] = (0.0, 1.0),
) -> str | None:
    """``unanswerable``, ``agreement_band`` or None (keep) from the policy's answers to a new question."""
    if num_samples < 1 or not 0 <= num_answered <= num_samples:
        raise ValueError(f"need 0 <= num_answered <= num_samples and num_samples >= 1, got {num_answered}, {num_samples}")
    if num_answered < min_answered * num_samples - 1e-9:
        return "unanswerable"
    low, high = band
    if not low - 1e-9 <= majority_share <= high + 1e-9:
        return "agreement_band"
    return None


def count_reasons(reasons: Iterable[str | None]) -> dict[str, int]:
    """{"candidates", "kept", one count per reason in ``REASONS`` (zeros included)}; None means kept."""
    tally = Counter(reasons)
    unknown = set(tally) - set(REASONS) - {None}
    if unknown:
        raise ValueError(f"unknown rejection reasons {sorted(unknown)}; known: {REASONS}")
    return {"candidates": sum(tally.values()), "kept": tally[None], **{r: tally[r] for r in REASONS}}


__all__ = [
    "CLOSE_TAG",
    "DIRECT_TEMPLATE",
    "IN_CONTEXT_TEMPLATE",
    "MODES",
    "OPEN_TAG",
    "REASONS",
    "SEED_ANSWER_POLICIES",
    "QuestionLimits",
    "answer_verdict",
    "choose_seed_answer",
    "count_reasons",
    "jaccard",
    "near_duplicates",
    "parse_question",
    "question_tokens",
    "screen_question",
    "shingles",
    "similarity",
    "synthesis_prompt",
]
