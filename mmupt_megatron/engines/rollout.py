"""The rollout-engine interface: what the trainer needs from a generation backend, and nothing more.

An engine turns prompts (each tagged with the group id of its question) into ``n`` sampled responses per
prompt, with the log-prob of every sampled token, and accepts new weights as an iterator of
(Hugging Face name, tensor). Algorithm and trainer code never branch on the backend.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    group_id: Hashable
    """Identifies the question; every response to this prompt carries it."""
    prompt: str
    """The chat-formatted prompt, one ``<|vision_start|><|image_pad|><|vision_end|>`` per image."""
    images: Sequence[Any] = field(default_factory=tuple)
    """PIL images, in the order of their placeholders."""


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    n: int
    """Responses per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    """Request i is sampled with seed + i, so results do not depend on how requests are batched."""
    per_request: bool = True
    """False: no per-request seeds (vLLM samples them all from its engine generator, ``seed`` unused): faster, but a
    response then depends on the batch it was sampled in (rollout.seed_per_request)."""
    stop_token_ids: tuple[int, ...] = ()
    banned_token_ids: tuple[int, ...] = ()
    """Never sampled (e.g. vision placeholders: a response must not contain image tokens)."""


@dataclass(frozen=True, slots=True)
class Rollout:
    group_id: Hashable
    prompt_index: int
    """Position of the request this response answers."""
    sample_index: int
    """0..n-1 within the request."""
    prompt_token_ids: list[int]
    """Prompt tokens as the engine tokenised them (image pads expanded)."""
    response_token_ids: list[int]
    response_logprobs: list[float]
    """Log-prob of each sampled token under the distribution the engine sampled it from (temperature, top-p)."""
    text: str
    finish_reason: str
    """stop (end-of-sequence or stop token) or length (max_new_tokens reached: possibly truncated)."""


class RolloutEngine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Rollout]:
        """``n`` rollouts per request, ordered by request then sample."""

    def prompt_logprobs(self, requests: Sequence[RolloutRequest], completions: Sequence[list[int]]) -> list[torch.Tensor]:
        """Log-probs at temperature 1 the engine assigns to given completion tokens (used to verify a refit)."""

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], *, manifest: Sequence[tuple[str, Sequence[int]]] | None = None,
    ) -> int:
        """Load (HF name, full tensor) pairs into the running engine; returns the number loaded. ``manifest``
        (the (name, shape) of every tensor ``weights`` will yield) lets the engine check them all before
        loading any: a refit is all or nothing."""

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs (no-op where unsupported)."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake what ``tags`` names after ``sleep`` ("weights", "kv_cache"; None: both)."""

    def close(self) -> None: ...
