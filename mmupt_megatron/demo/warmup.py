"""Supervised warm-up of the tiny Qwen2.5-VL on the synthetic world: the demo's "base model".

The paper starts from an instruction-tuned model that is already right more often than not; a random
tiny model is not, so the demo first teaches it the task with labelled target chains (this is the only
place labels are trained on). Fresh examples every batch, AdamW with linear warm-up then constant lr,
fp32. The base is chosen in two stages: an exponential moving average of the weights (``ema_decay``), evaluated
every ``eval_every`` steps, must reach the band's low end in sampled accuracy with every question type at
``min_kind_accuracy`` on ``consecutive`` evaluations in a row (the task is learnt, not a lucky moment); then the
base is the first *trained* weights whose own dev evaluation lies in ``band`` with greedy accuracy at most
``max_greedy``: those of the first of those evaluations, else of every ``fine_every`` steps from the last, for at
most ``search_steps`` (past them the nearest evaluated weights, with a warning). Good but not perfect, as the paper's
models are, and measured rather than inferred: a jump between evaluations changes which step is kept, not how good
the base is.

Measured (tally chains, shape + "all" questions, 10% question-writing rows, lr 3e-3, batch 64, a shared 2-core
box): "all" is solved by ~300 steps, shape questions break through between ~450 and ~700 steps, and at a constant
lr the weights swing between evaluations (seed 1, every 25 steps: sampled 0.79 -> 0.64 -> 0.70 -> 0.85 -> 0.66
-> 0.90 over steps 525-650). Floating-point differences between machines move the whole trajectory: on one machine
seed 0's weights were at dev sampled 0.973 when the average confirmed (step 550), then 0.953, 0.985, 0.937, 0.945,
0.948, 0.921 every 10 steps (the base: step 650, greedy 0.941). Both stages matter: from weights at the ceiling
MM-UPT has nothing to teach, and weights caught in the band before the average confirms (mid-breakthrough)
lost greedy accuracy under MM-UPT in 9 of 10 research runs (run.BASE_BAND).

Run:  .venv/bin/python -m mmupt_megatron.demo.warmup --out /tmp/demo_base --seed 0 --band 0.75 0.93
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmupt_megatron.data.images import ImageEncoder
from mmupt_megatron.algorithms.synthesis import CLOSE_TAG, MODES, OPEN_TAG, synthesis_prompt
from mmupt_megatron.data.synthetic import Example, WorldConfig, generate, make_example, question_text, sample_question
from mmupt_megatron.demo.model import PromptStyle, TinyModelConfig, build_model, encode_batch
from mmupt_megatron.demo.rollout import evaluate
from mmupt_megatron.demo.tokenizer import build_tokenizer

DEMO_STYLE = PromptStyle(system=None, instruction=" Answer in \\boxed{}.", image_first=False)
"""Short prompt, question before the image (the image tokens then see the question; DEMO.md)."""
DEMO_SYNTHESIS_TEMPLATES: dict[str, str] = {
    "in-context": "{question} Answer {answer} . Ask a different question .",
    "direct": "Ask a question about the image .",
}
"""The demo's question-writing prompts (``synthesis.in_context_template`` / ``direct_template`` in the demo
recipes), in the words of its small vocabulary."""
DEMO_WORLD = WorldConfig(chain_style="tally", question_weights=(0.0, 1.0, 1.0))
"""The demo's world: shape and "how many shapes" questions, tally chains (measured: colour questions need
the model to pick the asked attribute per cell, and stayed at a constant "green" for 1,100+ steps)."""


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    world: WorldConfig = DEMO_WORLD
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    style: PromptStyle = DEMO_STYLE
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    max_steps: int = 3000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    num_eval: int = 256
    eval_samples: int = 4
    max_new_tokens: int = 40
    band: tuple[float, float] | None = None
    """(low, high) sampled dev accuracy the kept base must have (None: train ``max_steps``, keep the last
    weights). The base is the first *trained* weights whose own evaluation lies in the band, with greedy accuracy at
    most ``max_greedy`` and every question type's greedy accuracy at least ``min_kind_accuracy``: good but not
    perfect, so a label-free run has headroom on greedy, sampled and majority answers."""
    max_greedy: float = 0.95
    """Greedy dev accuracy the kept weights may have at most (headroom for greedy answers)."""
    min_kind_accuracy: float = 0.7
    """Greedy accuracy every question type must reach in the kept weights: a type the base gets wrong more often
    than not is one the majority vote would teach wrong answers."""
    consecutive: int = 2
    """Evaluations of the averaged weights in a row (every ``eval_every`` steps) with sampled accuracy at least the
    band's low end and every question type at ``min_kind_accuracy`` before the search for the base starts: the
    model has learnt the task, not just caught a lucky moment of it."""
    fine_every: int = 10
    """Steps between evaluations of the trained weights while searching for the base."""
    search_steps: int = 200
    """Steps the search may take; past them the nearest evaluated weights are kept (with a warning)."""
    synthesis_share: float = 0.1
    """Share of warm-up examples that teach writing a question about the image (in-context or direct, half
    each; target ``<question> ... </question>``): the base's stand-in for a VLM's ability to ask questions,
    which MM-UPT's self-synthesized data needs."""
    ema_decay: float | None = 0.99
    """Evaluate an exponential moving average of the weights (decay per step) every ``eval_every`` steps to tell
    when the trained weights near the band (None: the weights themselves). Measured (seed 1, dev 256, every 25
    steps): the trained weights' sampled accuracy swung 0.79 -> 0.64 -> 0.70 -> 0.85 -> 0.66 -> 0.90 between
    steps 525 and 650 (lr 3e-3); the average's rose 0.72 -> 0.74 -> 0.77 -> 0.77 -> 0.79 over steps 550-675."""
    snapshots: bool = False
    """Also save a checkpoint at every evaluation, to ``{out_dir}/step{N}`` (to pick a base afterwards)."""

    def __post_init__(self) -> None:
        if not 0 <= self.synthesis_share < 1:
            raise ValueError(f"warmup: synthesis_share must be in [0, 1), got {self.synthesis_share}")
        if self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1:
            raise ValueError("warmup: batch_size, max_steps and eval_every must be >= 1")
        if self.band is not None and not 0 <= self.band[0] <= self.band[1] <= 1:
            raise ValueError(f"warmup: band must be (low, high) with 0 <= low <= high <= 1, got {self.band}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"warmup: ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.fine_every < 1 or self.consecutive < 1 or self.search_steps < 0 or not 0 <= self.min_kind_accuracy <= 1:
            raise ValueError(f"warmup: fine_every and consecutive must be >= 1, search_steps >= 0 and min_kind_accuracy "
                             f"in [0, 1], got {self.fine_every}, {self.consecutive}, {self.search_steps} and "
                             f"{self.min_kind_accuracy}")


def question_writing(rng: random.Random, example: Example, world: WorldConfig) -> tuple[str, str, str]:
    """(prompt text, target, instruction) of one question-writing example about ``example``'s image: the
    prompt ``synthesize`` builds with the demo templates, the target a world question in the tags (for
    in-context, one different from the seed question)."""
    mode = rng.choice(MODES)
    question = question_text(*sample_question(rng, world))
    for _ in range(20):
        if mode == "direct" or question != example.question:
            break
        question = question_text(*sample_question(rng, world))
    prompt = synthesis_prompt(mode, seed_question=example.question, seed_answer=example.answer,
                              template=DEMO_SYNTHESIS_TEMPLATES[mode])
    return prompt, f"{OPEN_TAG} {question} {CLOSE_TAG}", ""


def world_image_encoder(world: WorldConfig) -> ImageEncoder:
    """Pixel limits that keep the world's images exactly as drawn (one token per cell)."""
    return ImageEncoder(min_pixels=world.image_px**2, max_pixels=world.image_px**2)


def warmup(cfg: WarmupConfig, *, out_dir: str | Path | None = None, log: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    """Train; returns the model and the evaluation history. Saves the checkpoint when ``out_dir`` is set."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg.model, seed=cfg.seed)
    encoder = world_image_encoder(cfg.world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    rng = random.Random(cfg.seed * 7919 + 1)
    dev = generate(cfg.num_eval, seed=cfg.seed + 500_000, cfg=cfg.world, prefix="dev")
    history: list[dict] = []
    start = time.time()
    nearest: tuple | None = None  # (band distance, step, weights, evaluation) of the closest trained weights so far

    ema = copy.deepcopy(model) if cfg.ema_decay is not None else model
    if ema is not model:
        ema.requires_grad_(False)

    def train_step(step: int) -> float:
        examples = [make_example(rng, cfg.world, example_id=f"w{step}-{i}") for i in range(cfg.batch_size)]
        rows = [question_writing(rng, e, cfg.world) if rng.random() < cfg.synthesis_share
                else (e.question, e.chain, cfg.style.instruction) for e in examples]
        batch = encode_batch(tokenizer, questions=[r[0] for r in rows], images=[e.image for e in examples],
                             targets=[r[1] for r in rows], instructions=[r[2] for r in rows], encoder=encoder,
                             style=cfg.style)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if ema is not model:
            with torch.no_grad():
                for average, weight in zip(ema.parameters(), model.parameters(), strict=True):
                    average.lerp_(weight, 1.0 - cfg.ema_decay)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"warm-up loss became {loss.item()} at step {step}")
        return loss.item()

    def run_eval(step: int, loss: float, which: torch.nn.Module, *, of: str):  # -> demo.rollout.EvalResult
        result = evaluate(which, tokenizer, dev, encoder=encoder, style=cfg.style, num_samples=cfg.eval_samples,
                          max_new_tokens=cfg.max_new_tokens)
        history.append({"step": step, "loss": loss, "seconds": time.time() - start, "of": of, **dataclasses.asdict(result)})
        if log:
            print(f"[warmup seed {cfg.seed}] step {step} loss {loss:.4f} {time.time() - start:.0f}s {of:<7} {result.row()}",
                  flush=True)
        if cfg.snapshots and out_dir is not None:
            save_checkpoint(which, tokenizer, out_dir=Path(out_dir) / f"step{step}{'' if of == 'weights' else '_average'}",
                            cfg=cfg, history=history)
        return result

    def keep(step: int, result, how: str) -> None:  # noqa: ANN001 - demo.rollout.EvalResult
        history.append({"step": step, "kept": True, "how": how, **dataclasses.asdict(result)})
        if log:
            print(f"[warmup seed {cfg.seed}] keeping the weights of step {step} ({how}): {result.row()}", flush=True)

    def consider(step: int, loss: float, weights: torch.nn.Module) -> bool:
        """Evaluate trained ``weights`` of ``step``; keep them (True) if they are in the band."""
        nonlocal nearest
        result = run_eval(step, loss, weights, of="weights")
        distance = band_distance(result, cfg)
        if distance == 0.0:
            model.load_state_dict(weights.state_dict())
            keep(step, result, "the first trained weights in the band")
            return True
        if nearest is None or distance < nearest[0]:
            nearest = (distance, step, {k: v.detach().clone() for k, v in weights.state_dict().items()}, result)
        return False

    settled = 0  # evaluations of the average in a row that met the band's low end
    first: tuple[int, float, torch.nn.Module] | None = None  # the trained weights at the first of them
    search_from: int | None = None  # the step the search for the base started
    for step in range(1, cfg.max_steps + 1):
        loss = train_step(step)
        if search_from is None and step % cfg.eval_every == 0:
            settled = settled + 1 if learnt(run_eval(step, loss, ema, of="average"), cfg) else 0
            if settled == 1:
                first = (step, loss, copy.deepcopy(model))
            if settled >= cfg.consecutive:
                search_from = step
                if consider(*first):  # the weights the average confirmed, if they are in the band
                    break
                if first[0] == step:  # consecutive=1: those were this step's weights
                    continue
        if search_from is not None and (step - search_from) % cfg.fine_every == 0:
            if consider(step, loss, model):
                break
            if step - search_from >= cfg.search_steps:
                model.load_state_dict(nearest[2])
                keep(nearest[1], nearest[3], f"no trained weights were in the band in {cfg.search_steps} steps; "
                     f"the nearest (distance {nearest[0]:.3f})")
                if log:
                    print(f"[warmup seed {cfg.seed}] WARNING: the base is outside the band {cfg.band}", flush=True)
                break
    else:
        if log and cfg.band is not None:
            print(f"[warmup seed {cfg.seed}] WARNING: no base in the band {cfg.band} in {cfg.max_steps} steps; keeping "
                  "the last weights", flush=True)
    if out_dir is not None:
        save_checkpoint(model, tokenizer, out_dir=out_dir, cfg=cfg, history=history)
    return model, history


def learnt(result, cfg: WarmupConfig) -> bool:  # noqa: ANN001 - demo.rollout.EvalResult
    """Sampled accuracy at least the band's low end and every question type's greedy accuracy at least
    ``min_kind_accuracy`` (never without a band)."""
    return cfg.band is not None and result.sampled >= cfg.band[0] and _weakest_kind(result) >= cfg.min_kind_accuracy


def band_distance(result, cfg: WarmupConfig) -> float:  # noqa: ANN001 - demo.rollout.EvalResult
    """How far an evaluation is from the base ``cfg`` asks for (0: inside): sampled accuracy outside ``band``,
    greedy above ``max_greedy``, the weakest question type below ``min_kind_accuracy`` (each in accuracy points)."""
    low, high = cfg.band if cfg.band is not None else (0.0, 1.0)
    return (max(low - result.sampled, 0.0) + max(result.sampled - high, 0.0) + max(result.greedy - cfg.max_greedy, 0.0)
            + max(cfg.min_kind_accuracy - _weakest_kind(result), 0.0))


def _weakest_kind(result) -> float:  # noqa: ANN001 - demo.rollout.EvalResult
    """The lowest greedy accuracy over question types (0 without any)."""
    return min(result.by_kind.values(), default=0.0)


def save_checkpoint(model: torch.nn.Module, tokenizer, *, out_dir: str | Path, cfg: WarmupConfig, history: list[dict]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    world_image_encoder(cfg.world).save_config(out)
    meta = {"warmup": dataclasses.asdict(cfg), "history": history}
    (out / "demo_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return out


def load_style(folder: str | Path) -> tuple[PromptStyle, WorldConfig]:
    """The prompt style and world a saved base model was warmed up with."""
    meta = json.loads((Path(folder) / "demo_meta.json").read_text())["warmup"]
    world = dict(meta["world"])
    world["shape_px"] = tuple(world["shape_px"])
    world["background"] = tuple(world["background"])
    world["question_weights"] = tuple(world["question_weights"])
    return PromptStyle(**meta["style"]), WorldConfig(**world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="sampled dev accuracy of the kept weights (default: train --max-steps)")
    parser.add_argument("--max-greedy", type=float, default=0.95)
    parser.add_argument("--min-kind-accuracy", type=float, default=0.7)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--chain", default="tally", choices=["named", "tally", "describe"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--snapshots", action="store_true", help="save a checkpoint at every evaluation")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--question-weights", type=float, nargs=3, default=(0.0, 1.0, 1.0),
                        help="weights of colour / shape / all questions")
    parser.add_argument("--hard", action="store_true", help="warm up on the hard world")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world_args = {"chain_style": args.chain, "question_weights": tuple(args.question_weights)}
    world = WorldConfig.hard(**world_args) if args.hard else WorldConfig(**world_args)
    cfg = WarmupConfig(world=world, seed=args.seed, lr=args.lr,
                       max_steps=args.max_steps, snapshots=args.snapshots,
                       band=tuple(args.band) if args.band else None, max_greedy=args.max_greedy,
                       min_kind_accuracy=args.min_kind_accuracy,
                       eval_every=args.eval_every)
    warmup(cfg, out_dir=args.out)


if __name__ == "__main__":
    main()
