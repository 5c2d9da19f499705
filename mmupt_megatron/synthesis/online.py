"""Online synthesis: the trainer's pool gets fresh questions written by the current policy.

    mmupt train demo_synthetic model.path=... synthesis.refresh_every=10 synthesis.refresh_fraction=0.25

Before step k (k > 0, a multiple of ``synthesis.refresh_every``), ``PoolRefresher.before_step``:

1. draws ``round(refresh_fraction * pool size)`` seed rows (at least one) from the *original* training rows
   (the seed pool: synthesized questions are never seeds of further ones, so errors do not compound);
2. synthesizes questions about their images with the trainer's rollout engine, which serves the weights
   after step k - 1 (``synthesize``: same prompts, filters and agreement band as ``mmupt synthesize``);
3. writes the kept ones over as many randomly drawn pool positions (earlier synthesized questions may be
   replaced again). The pool keeps its size, so the data sampler's order and resume state stay valid; when
   fewer questions pass the filters than requested, fewer positions change (the metrics say how many).

Seeds and positions come from ``Random((trainer.seed, k))``; sampling seeds from ``synthesis.seed`` and k.
Every refresh writes the pool's synthesized positions to ``OUTPUT/synthesis/pool_step_<k>.json``;
``restore(last_step)`` re-applies the latest one at or before a resumed checkpoint's step (generation cannot
be replayed: it depends on the weights of that time).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.config import Config
from mmupt_megatron.data.dataset import Sample
from mmupt_megatron.synthesis.run import Generate, synthesize

_POOL_FILE = re.compile(r"^pool_step_(\d{6})\.json$")


class PoolRefresher:
    """Replaces part of ``pool`` (a list of ``Sample``, changed in place) every ``refresh_every`` steps."""

    def __init__(self, pool: list[Sample], *, cfg: Config, generate: Generate, out_dir: str | Path,
                 matcher: AnswerMatcher | None = None) -> None:
        if not pool:
            raise ValueError("online synthesis needs a non-empty training pool")
        if cfg.synthesis.refresh_every < 1:
            raise ValueError(f"synthesis.refresh_every must be >= 1 for online synthesis, got {cfg.synthesis.refresh_every}")
        self.pool = pool
        self.seeds = tuple(pool)
        self.cfg = cfg
        self.generate = generate
        self.folder = Path(out_dir) / "synthesis"
        self.matcher = matcher or AnswerMatcher(use_math_verify=cfg.reward.use_math_verify,
                                                timeout_s=cfg.reward.verify_timeout_s)
        self.synthetic: dict[int, dict[str, Any]] = {}
        """Pool position -> the synthesized question there (id, question, seed_index, step)."""

    def due(self, step: int) -> bool:
        return step > 0 and step % self.cfg.synthesis.refresh_every == 0

    def before_step(self, step: int) -> dict[str, float]:
        """Refresh the pool if ``step`` is due; the refresh's metrics (empty otherwise)."""
        if not self.due(step):
            return {}
        s = self.cfg.synthesis
        rng = random.Random(f"{self.cfg.trainer.seed}:refresh:{step}")
        wanted = max(1, round(s.refresh_fraction * len(self.pool)))
        seed_rows = rng.sample(range(len(self.seeds)), min(wanted, len(self.seeds)))
        result = synthesize(self.generate, self.seeds, synthesis=s, data=self.cfg.data, rollout=self.cfg.rollout,
                            indices=seed_rows, model_step=step, seed=s.seed + 7_919 * step, matcher=self.matcher)
        new = result.questions[:wanted]
        for position, question in zip(rng.sample(range(len(self.pool)), len(new)), new, strict=True):
            self.synthetic[position] = {"id": question.id, "question": question.question,
                                        "seed_index": question.seed_index, "step": step}
            self._apply(position)
        self._save(step, result.summary())
        print(f"step {step}: online synthesis replaced {len(new)} of {len(self.pool)} pool questions; "
              f"{result.describe()}", flush=True)
        return {
            "synthesis/replaced": float(len(new)),
            "synthesis/pool_synthetic": len(self.synthetic) / len(self.pool),
            **{f"synthesis/{key}": float(value) for key, value in result.counts.items()},
            "time/synthesis": result.seconds,
        }

    def _apply(self, position: int) -> None:
        entry = self.synthetic[position]
        seed = self.seeds[entry["seed_index"]]
        self.pool[position] = replace(seed, id=entry["id"], question=entry["question"], answer=None,
                                      origin=f"{seed.origin}, synthesized before step {entry['step']}")

    def _save(self, step: int, summary: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "num_seeds": len(self.seeds), "pool_size": len(self.pool), "summary": summary,
                 "synthetic": {str(k): v for k, v in sorted(self.synthetic.items())}}
        tmp = self.folder / f"pool_step_{step:06d}.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.folder / f"pool_step_{step:06d}.json")

    def restore(self, last_step: int) -> int | None:
        """Re-apply the pool as of the end of ``last_step``; returns the refresh step restored (None: none)."""
        saved = sorted(
            (int(m.group(1)), p) for p in (self.folder.iterdir() if self.folder.is_dir() else [])
            if (m := _POOL_FILE.match(p.name)) and int(m.group(1)) <= last_step
        )
        if not saved:
            return None
        step, path = saved[-1]
        state = json.loads(path.read_text())
        if (state["num_seeds"], state["pool_size"]) != (len(self.seeds), len(self.pool)):
            raise ValueError(f"{path}: written for {state['num_seeds']} seed rows and a pool of {state['pool_size']}, "
                             f"but the training data now has {len(self.seeds)}: the data changed since the checkpoint")
        synthetic = {int(k): v for k, v in state["synthetic"].items()}
        for entry in synthetic.values():
            if not entry["id"].startswith(self.seeds[entry["seed_index"]].id + "#"):
                raise ValueError(f"{path}: {entry['id']!r} was synthesized from seed row {entry['seed_index']}, which is "
                                 f"now {self.seeds[entry['seed_index']].id!r}: the data changed since the checkpoint")
        self.pool[:] = self.seeds
        self.synthetic = synthetic
        for position in self.synthetic:
            self._apply(position)
        return step


class _NoRefresh:
    """``synthesis.refresh_every = 0``: nothing to do."""

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def restore(self, last_step: int) -> None:
        return None


def pool_refresher(cfg: Config, pool: list[Sample], *, cluster: Any, out_dir: str | Path) -> PoolRefresher | _NoRefresh:
    """The trainer's refresher: generation through ``cluster.generate``; a no-op when off.

    ValueError when the engine (sized by ``rollout.*``) is too short for the synthesis budget (``synthesis.*``).
    """
    if not cfg.synthesis.refresh_every:
        return _NoRefresh()
    r, s = cfg.rollout, cfg.synthesis
    if s.max_prompt_length + s.max_new_tokens > r.max_prompt_length + r.max_new_tokens:
        raise ValueError(
            f"online synthesis runs on the trainer's engine, which holds rollout.max_prompt_length + "
            f"rollout.max_new_tokens = {r.max_prompt_length + r.max_new_tokens} tokens, but synthesis prompts and "
            f"questions need synthesis.max_prompt_length + synthesis.max_new_tokens = "
            f"{s.max_prompt_length + s.max_new_tokens}: raise rollout.max_prompt_length or lower the synthesis budget"
        )
    return PoolRefresher(pool, cfg=cfg, generate=cluster.generate, out_dir=out_dir)


__all__ = ["PoolRefresher", "pool_refresher"]
