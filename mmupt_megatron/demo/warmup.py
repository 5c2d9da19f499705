"""Supervised warm-up of the tiny Qwen2.5-VL on the synthetic world: the demo's "base model".

The paper starts from an instruction-tuned model that is already right more often than not; a random
tiny model is not, so the demo first teaches it the task with labelled target chains (this is the only
place labels are trained on). Fresh examples every batch, AdamW with linear warm-up then constant lr,
fp32. The warm-up stops early once held-out *sampled* accuracy reaches ``target_sampled`` (the demo wants
a base that is good but not perfect: ~0.75-0.85 sampled, DEMO.md), or after ``max_steps``.

Output: an HF checkpoint folder (``config.json`` + weights, tokenizer, ``preprocessor_config.json``) and
``demo_meta.json`` (world, prompt style, the accuracy at the stop).

Measured (tally chains, shape + "all" questions, 10% question-writing rows, lr 3e-3, batch 64, 1 thread on
a shared 2-core box): "all" is solved by ~300 steps, shape questions break through between ~500 and ~700
steps. At a constant lr the weights themselves swing between evaluations (seed 1, every 25 steps: sampled
0.79 -> 0.64 -> 0.70 -> 0.85 -> 0.66 -> 0.90 over steps 525-650), so a stop on one evaluation kept a base
from a lucky (or unlucky) moment, and MM-UPT from such a base moved with the swing (research.quick_grpo from
seed 1's step 600, greedy 0.945: greedy 0.906, shape questions 0.87 -> 0.78). The warm-up therefore keeps an
exponential moving average of the weights (``ema_decay``; its sampled accuracy rose 0.72 -> 0.74 -> 0.77 ->
0.77 -> 0.79 -> 0.84 over steps 550-700) and stops only when the criterion (``stop_criterion``), measured on the
average, holds on ``consecutive`` evaluations in a row. It then keeps the trained weights of the first of them
(``keep_average``: the average itself is already at the tiny model's greedy ceiling, so it leaves MM-UPT nothing
to show on greedy answers); with the demo's settings (run.BASE_*) seed 1 kept step 650 after 5 minutes.

Run:  .venv/bin/python -m mmupt_megatron.demo.warmup --out /tmp/demo_base --seed 0 --target-sampled 0.75
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
    target_sampled: float | None = None
    """Stop once the sampled accuracy has reached this, with every question type's greedy accuracy at least
    ``min_kind_accuracy``, on ``consecutive`` evaluations in a row (None: run max_steps)."""
    min_kind_accuracy: float = 0.6
    """Greedy accuracy every question type must reach before the warm-up may stop: a type the base gets wrong
    more often than not is one the majority vote would teach wrong answers."""
    consecutive: int = 2
    """Evaluations in a row on which the stop criterion must hold (one lucky evaluation cannot stop it); the
    model of the first of them is kept."""
    synthesis_share: float = 0.1
    """Share of warm-up examples that teach writing a question about the image (in-context or direct, half
    each; target ``<question> ... </question>``): the base's stand-in for a VLM's ability to ask questions,
    which MM-UPT's self-synthesized data needs."""
    ema_decay: float | None = 0.99
    """Evaluate, stop on and save an exponential moving average of the weights (decay per step) instead of the
    weights themselves (None: the weights). Measured (seed 1, dev 256, every 25 steps): the raw weights' sampled
    accuracy swung 0.79 -> 0.64 -> 0.70 -> 0.85 -> 0.66 -> 0.90 between steps 525 and 650 (lr 3e-3); the
    average's rose 0.72 -> 0.74 -> 0.77 -> 0.77 -> 0.79 over steps 550-675."""
    keep_average: bool = False
    """Save the averaged weights as the base (True), or the trained weights at the evaluation the average
    confirmed (False: the default). The average decides *when* to stop (one lucky evaluation of the swinging
    weights cannot stop it); the weights at that moment are the base. Measured (research.quick_grpo, 40 steps,
    512 held-out questions): from the averages of seeds 0 / 1 / 2, greedy is at the tiny model's ceiling
    (0.95-0.98 dev) and neither MM-UPT nor supervised GRPO raises it (seed 1: 0.973 -> 0.965 voting, 0.959 with
    labels, 100 steps); from the weights at the same kind of moment (steps 550-750 of seeds 0-2) MM-UPT took
    greedy up in 8 of 10 runs (+0.2 to +7.6 points;
    0.85-0.97 -> 0.91-0.99), down in 2 (-1.5, and -10.3 in a run that drifted to consistently wrong answers)."""
    snapshots: bool = False
    """Also save a checkpoint at every evaluation, to ``{out_dir}/step{N}`` (to pick a base afterwards)."""

    def __post_init__(self) -> None:
        if not 0 <= self.synthesis_share < 1:
            raise ValueError(f"warmup: synthesis_share must be in [0, 1), got {self.synthesis_share}")
        if self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1:
            raise ValueError("warmup: batch_size, max_steps and eval_every must be >= 1")
        if self.target_sampled is not None and not 0 < self.target_sampled <= 1:
            raise ValueError(f"warmup: target_sampled must be in (0, 1], got {self.target_sampled}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"warmup: ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.consecutive < 1 or not 0 <= self.min_kind_accuracy <= 1:
            raise ValueError(f"warmup: consecutive must be >= 1 and min_kind_accuracy in [0, 1], got "
                             f"{self.consecutive} and {self.min_kind_accuracy}")


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
    step = 0
    ready = 0  # evaluations in a row that met the stop criterion
    first_ready: tuple[int, dict] | None = None  # the step and the kept weights at the first of them

    ema = copy.deepcopy(model) if cfg.ema_decay is not None else model
    if ema is not model:
        ema.requires_grad_(False)
    kept = ema if cfg.keep_average else model  # what is saved as the base

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

    def run_eval(step: int, loss: float) -> dict:
        result = evaluate(ema, tokenizer, dev, encoder=encoder, style=cfg.style, num_samples=cfg.eval_samples,
                          max_new_tokens=cfg.max_new_tokens)
        history.append({"step": step, "loss": loss, "seconds": time.time() - start, **dataclasses.asdict(result)})
        if log:
            print(f"[warmup seed {cfg.seed}] step {step} loss {loss:.4f} {time.time() - start:.0f}s {result.row()}", flush=True)
        return result

    for step in range(1, cfg.max_steps + 1):
        loss = train_step(step)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            result = run_eval(step, loss)
            if cfg.snapshots and out_dir is not None:
                save_checkpoint(ema, tokenizer, out_dir=Path(out_dir) / f"step{step}", cfg=cfg, history=history)
            ready = ready + 1 if stop_criterion(result, cfg) else 0
            if ready == 1:
                first_ready = (step, {k: v.detach().clone() for k, v in kept.state_dict().items()})
            if ready >= cfg.consecutive:
                # the model at the first of them: confirmed by the later evaluations, not yet trained further
                kept.load_state_dict(first_ready[1])
                record = {"step": first_ready[0], "kept": True}
                if kept is not ema:  # the weights themselves were not evaluated: their dev accuracy, for the record
                    record.update(dataclasses.asdict(evaluate(kept, tokenizer, dev, encoder=encoder, style=cfg.style,
                                                              num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens)))
                history.append(record)
                if log:
                    print(f"[warmup seed {cfg.seed}] keeping the {'averaged ' if kept is ema else ''}weights of step "
                          f"{first_ready[0]}: the stop criterion held there and on the next {ready - 1} evaluation(s)"
                          + (f"; the weights: greedy {record['greedy']:.3f} sampled {record['sampled']:.3f}"
                             if kept is not ema else ""), flush=True)
                break
    else:
        if log and cfg.target_sampled is not None:
            print(f"[warmup seed {cfg.seed}] WARNING: the stop criterion was not met in {cfg.max_steps} steps; "
                  "keeping the last model", flush=True)
    if out_dir is not None:
        save_checkpoint(kept, tokenizer, out_dir=out_dir, cfg=cfg, history=history)
    return kept, history


def stop_criterion(result, cfg: WarmupConfig) -> bool:  # noqa: ANN001 - demo.rollout.EvalResult
    """Sampled accuracy at least ``target_sampled`` and every question type's greedy accuracy at least
    ``min_kind_accuracy`` (never met without a target)."""
    return (cfg.target_sampled is not None and result.sampled >= cfg.target_sampled
            and min(result.by_kind.values(), default=0.0) >= cfg.min_kind_accuracy)


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
    parser.add_argument("--target-sampled", type=float, default=None)
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
                       max_steps=args.max_steps, target_sampled=args.target_sampled, snapshots=args.snapshots,
                       eval_every=args.eval_every)
    warmup(cfg, out_dir=args.out)


if __name__ == "__main__":
    main()
