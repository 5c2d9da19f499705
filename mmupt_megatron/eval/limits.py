"""The serving engine's real limits, read from the model folder before the engine starts.

vLLM refuses (with its own raw error, after a slow start) a ``max_model_len`` above the model's derived
context (``max_position_embeddings`` in config.json or its ``text_config``, capped by the tokenizer's
``model_max_length``), and a prompt longer than ``max_model_len``. Its image processor resizes the image we
already fitted to ``data.min/max_pixels`` once more with the model's own ``preprocessor_config.json`` pixel
limits, so the image tokens it counts follow both. ``engine_limits`` reads those numbers and
``check_context`` names the config keys to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCALED_ROPE = ("linear", "dynamic")  # rope types whose factor vLLM applies to max_position_embeddings


@dataclass(frozen=True)
class EngineLimits:
    max_positions: int | None
    """The model's context length as vLLM derives it; None when the folder does not say."""
    source: str
    """Where ``max_positions`` comes from (``config.json text_config.max_position_embeddings``)."""
    pixels: tuple[int, int] | None
    """The processor's (min_pixels, max_pixels); None when the folder has no preprocessor_config.json."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def _positions(config: dict[str, Any], where: str) -> tuple[int, str] | None:
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value <= 0:
        return None
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind in _SCALED_ROPE and isinstance(rope.get("factor"), int | float):
        return int(value * rope["factor"]), f"{where}max_position_embeddings x rope factor {rope['factor']}"
    return value, f"{where}max_position_embeddings"


def engine_limits(model_dir: str | Path) -> EngineLimits:
    folder = Path(model_dir)
    config = _read_json(folder / "config.json")
    found = [p for p in (_positions(config.get("text_config") or {}, "text_config."), _positions(config, "")) if p]
    positions, source = min(found) if found else (None, "")
    source = f"config.json {source}" if found else ""
    tokenizer_max = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < (positions or float("inf")):
        positions, source = tokenizer_max, "tokenizer_config.json model_max_length"
    processor = _read_json(folder / "preprocessor_config.json")
    size = processor.get("size") or {}
    low = processor.get("min_pixels", size.get("shortest_edge") if isinstance(size, dict) else None)
    high = processor.get("max_pixels", size.get("longest_edge") if isinstance(size, dict) else None)
    pixels = (int(low), int(high)) if isinstance(low, int | float) and isinstance(high, int | float) else None
    return EngineLimits(max_positions=positions, source=source, pixels=pixels)


def check_context(limits: EngineLimits, *, max_prompt_length: int, max_new_tokens: int, model: str | Path,
                  section: str = "rollout") -> int:
    """The engine's max_model_len (prompt + new tokens); ValueError naming the keys (``section.max_prompt_length``,
    ``section.max_new_tokens``) when the model is shorter."""
    max_model_len = max_prompt_length + max_new_tokens
    if limits.max_positions is not None and max_model_len > limits.max_positions:
        raise ValueError(
            f"{section}.max_prompt_length={max_prompt_length} + {section}.max_new_tokens={max_new_tokens} = "
            f"{max_model_len} tokens is more than the model serves: {limits.max_positions} ({limits.source} in "
            f"{model}); lower {section}.max_new_tokens (or {section}.max_prompt_length) so that they add up to at "
            f"most {limits.max_positions}"
        )
    return max_model_len
