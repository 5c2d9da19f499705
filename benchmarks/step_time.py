"""Step time of the GRPO update, old path vs new, on a demo-size step (issue 12).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_time.py [--repeats 3] [--truncated 0.035] [--max-tokens 2048]
                                                             [--unanimous 0.5]

The batch is the demo recipe's (configs/demo.yaml): the demo's model architecture (``mmupt_megatron.demo.model``,
built untrained with seed 0; KL on, so a reference model too), 16 prompts of the demo world (84 x 84 images)
x 16 responses. The responses are each question's labelled answer chain (the demo's response format, ~22
tokens), a ``--truncated`` share of them (3.5% measured in the demo's step 1) run on to ``rollout.max_new_tokens``
as a truncated response would. Rewards (seed 0): a ``--unanimous`` share of the groups get one reward for every
response (a unanimous vote: advantage 0; the demo's recipe dropped 53% of its groups as such), the others a reward
of 1 with probability 0.8 per response; advantages are group-normalised.

Each path runs in a fresh process with one policy rank (world 1, gloo, one thread), exactly the worker the
trainer's Ray actors hold: old log-probs, reference log-probs, then one optimizer step, ``--repeats`` times
(the table shows the fastest repeat of each phase; the loss and log-probs are the first repeat's, from the same
initial weights). Bytes are what the driver pickles for the workers over the step's three calls (Ray's
serialisation carries the same tensors).

Paths (rows): ``old``: one image copy per sample, ``trainer.micro_batch_size`` sequences per micro-batch padded to
the batch's longest, an old-log-prob pass, every group trained (the code before issue 12); ``tokens``: each
prompt's image once and ``trainer.max_tokens_per_micro_batch`` micro-batches grouped by length; ``+on-policy``:
also no old-log-prob pass (the demo's steps are one update: the training forward's own log-probs serve); ``new``:
also the groups with all-zero advantages dropped (``algorithm.drop_zero_advantage_groups``, the default);
``+packed`` / ``new packed``: ``+on-policy`` / ``new`` with each micro-batch's sequences in one packed row
(``trainer.sequence_packing=true``, first fit under the same budget). A
feature becomes a row by adding a ``StepPath`` to ``PATHS``; ratios are always against ``old``. The loss and the
log-prob comparison (reference log-probs, the same weights as the old pass's) are shown where the maths is the
old path's: dropping groups drops their KL term, by design (the token-mean's denominator stays the full batch's,
``algorithm.loss_over=batch``, so the policy-gradient term is the old one).
Target: the new step at most 0.6x the old one's time, with the same loss (1e-5) where the maths is unchanged.

Measured (2-core CPU shared with a running demo, 2026-12-01, ``--repeats 1``, default budget 2048, 50% unanimous):

| path | flags | sequences | log-probs (old+ref) s | train s | step s | step / old | padding waste | bytes to policy | bytes / old | loss | max log-prob diff vs old |
|---|---|---|---|---|---|---|---|---|---|---|---|
| old | - | 256 | 1.731 | 1.396 | 3.127 | 1.00x | 26.3% | 125.23 MiB | 1.00x | -0.0014632 | 0.0e+00 |
| tokens | images_once, token_budget | 256 | 0.971 | 1.003 | 1.974 | 0.63x | 3.4% | 8.94 MiB | 0.07x | -0.0014632 | 0.0e+00 |
| +on-policy | images_once, token_budget, on_policy | 256 | 0.473 | 1.066 | 1.540 | 0.49x | 3.4% | 5.90 MiB | 0.05x | -0.0014632 | 0.0e+00 |
| new | images_once, token_budget, on_policy, drop_zero | 96 | 0.202 | 0.399 | 0.601 | 0.19x | 10.0% | 2.21 MiB | 0.02x | (-0.0014632) | - |
| +packed | images_once, token_budget, on_policy, packed | 256 | 0.490 | 0.925 | 1.415 | 0.45x | 0.0% | 5.90 MiB | 0.05x | -0.0014632 | 0.0e+00 |
| new packed | images_once, token_budget, on_policy, drop_zero, packed | 96 | 0.281 | 0.513 | 0.794 | 0.25x | 0.0% | 2.21 MiB | 0.02x | (-0.0014632) | - |

The ``new`` rows' loss equals the old one here: the normaliser is the full batch's (``algorithm.loss_over=batch``)
and, at the reference's own weights, the dropped groups' KL term is zero (with the trained groups' tokens only as
the normaliser, ``loss_over=trained``, it read -0.0039307). An earlier run (``--repeats 3``, no demo running)
measured the same ratios within the box's swing: 0.71x / 0.43x / 0.19x / 0.49x / 0.17x.

Images once + the token budget alone measured 0.57x-0.71x over several runs (the forwards are matmul-bound: the
step costs about what its tokens do, 13.1k computed vs 17.2k, of 12.8k real); the on-policy skip removes one of
the three forwards; dropping unanimous groups removes their tokens from every pass (here 10 of 16 groups).
Packed rows compute no padding in the linear layers (0.0%; the same loss and log-probs to the last digit) and run
about as fast as length buckets here (0.45x vs 0.49x and 0.25x vs 0.19x in this run, 0.49x vs 0.43x and 0.17x vs
0.19x in the earlier one: within this box's run-to-run swing): on CPU
the attention of a row still runs its sequences side by side padded to the row's longest
(``models/packed_attention.py``), where a GPU runs one Transformer Engine THD kernel over the real tokens only. So CPU
runs bucket (``trainer.sequence_packing=auto``) and these rows check the packed path's maths, not its GPU speed.
(The first version, one attention call per sequence, measured 0.79x / 0.33x.)
"""

from __future__ import annotations

import argparse
import pickle
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StepPath:
    images_once: bool = False
    """Each prompt's image once (``image_index_B``) instead of one copy per sample."""
    token_budget: bool = False
    """Micro-batches by ``--max-tokens`` instead of ``trainer.micro_batch_size``."""
    on_policy: bool = False
    """No old-log-prob forward: the training forward's own log-probs, detached, are the old ones."""
    drop_zero: bool = False
    """Groups whose advantages are all zero left out of every pass."""
    packed: bool = False
    """Each micro-batch's sequences end to end in one row (``trainer.sequence_packing``; CPU: attention per sequence)."""


PATHS = {"old": StepPath(), "tokens": StepPath(images_once=True, token_budget=True),
         "+on-policy": StepPath(images_once=True, token_budget=True, on_policy=True),
         "new": StepPath(images_once=True, token_budget=True, on_policy=True, drop_zero=True),
         "+packed": StepPath(images_once=True, token_budget=True, on_policy=True, packed=True),
         "new packed": StepPath(images_once=True, token_budget=True, on_policy=True, drop_zero=True, packed=True)}


def build_inputs(folder: Path, *, truncated: float, unanimous: float, seed: int = 0) -> dict:
    """The demo model (untrained) saved to ``folder``, and the step's rollouts, images and advantages."""
    import torch

    from mmupt_megatron.algorithms import group_advantages
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.data.configured import image_encoder, prompt_for
    from mmupt_megatron.data.prompts import expand_image_pads
    from mmupt_megatron.data.synthetic import generate
    from mmupt_megatron.demo.model import TinyModelConfig, build_model
    from mmupt_megatron.demo.tokenizer import build_tokenizer
    from mmupt_megatron.demo.warmup import DEMO_WORLD, WarmupConfig, save_checkpoint
    from mmupt_megatron.engines.rollout import Rollout

    cfg = load_config("demo", [])
    tokenizer = build_tokenizer()
    save_checkpoint(build_model(tokenizer, TinyModelConfig(), seed=seed), tokenizer, out_dir=folder,
                    cfg=WarmupConfig(seed=seed), history=[])
    rng = random.Random(seed)
    encoder = image_encoder(cfg.data)
    examples = generate(cfg.trainer.prompts_per_step, seed=seed, cfg=DEMO_WORLD, prefix="bench")
    rollouts, images, rewards = [], {}, []
    for p, example in enumerate(examples):
        pixels, grid = encoder.encode([example.image])
        images[p] = (pixels, grid)
        prompt = tokenizer(expand_image_pads(prompt_for(example.question, cfg.data), grid.tolist()))["input_ids"]
        chain = tokenizer(example.chain)["input_ids"] + [tokenizer.eos_token_id]
        agreed = float(rng.random() < 0.8) if rng.random() < unanimous else None  # a unanimous group's one reward
        for s in range(cfg.rollout.n):
            response = chain[: cfg.rollout.max_new_tokens]
            if rng.random() < truncated:
                response = (chain * cfg.rollout.max_new_tokens)[: cfg.rollout.max_new_tokens]
            rollouts.append(Rollout(group_id=p, prompt_index=p, sample_index=s, prompt_token_ids=prompt,
                                    response_token_ids=response, response_logprobs=[0.0] * len(response), text="",
                                    finish_reason="length" if len(response) == cfg.rollout.max_new_tokens else "stop"))
            rewards.append(agreed if agreed is not None else float(rng.random() < 0.8))
    advantages = group_advantages(rewards, [r.group_id for r in rollouts], estimator=cfg.algorithm.advantage,
                                  normalize_std=cfg.algorithm.normalize_std)
    return {"rollouts": rollouts, "images": images, "advantages": torch.as_tensor(advantages, dtype=torch.float32),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}


def run_path(name: str, folder: Path, *, repeats: int, max_tokens: int) -> dict:
    """One path in this process: ``repeats`` steps; times per phase, bytes, padding, loss, first log-probs."""
    import torch

    from mmupt_megatron.algorithms.group_selection import filled_batch_scale, select_groups
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.distributed.parallel import ParallelDims, free_port
    from mmupt_megatron.trainer.batching import loss_normalisers, pack_rollouts
    from mmupt_megatron.trainer.cluster import policy_optim_config
    from mmupt_megatron.trainer.workers import PolicyWorker

    torch.set_num_threads(1)
    path = PATHS[name]
    cfg = load_config("demo", [f"model.path={folder}", f"trainer.sequence_packing={str(path.packed).lower()}"]
                      + ([f"trainer.max_tokens_per_micro_batch={max_tokens}"] if path.token_budget else []))
    inputs = torch.load(folder / "inputs.pt", weights_only=False)  # this run's own temp folder (Rollout objects)
    worker = PolicyWorker(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), dims=ParallelDims(),
                          model_dir=str(folder), optim=policy_optim_config(cfg),
                          with_reference=cfg.algorithm.loss.kl_coef > 0, seed=cfg.trainer.seed)
    times: dict[str, list[float]] = {"logprobs": [], "train": []}
    out: dict = {}
    for repeat in range(repeats):
        start = time.perf_counter()
        rollouts, advantages = inputs["rollouts"], inputs["advantages"]
        scale = (1.0, 1.0)
        if path.drop_zero:
            selection = select_groups(advantages.tolist(), [r.group_id for r in rollouts],
                                      target_groups=cfg.trainer.prompts_per_step)
            scale = filled_batch_scale(selection, [len(r.response_token_ids) for r in rollouts])  # loss_over=batch
            keep = list(selection.keep)
            rollouts, advantages = [rollouts[i] for i in keep], advantages[keep]
        batch = pack_rollouts(rollouts, pad_id=inputs["pad_id"], images=inputs["images"],
                              advantages_B=advantages, images_once=path.images_once)
        sent = 0
        if not path.on_policy:
            sent += len(pickle.dumps(batch))
            batch.old_logprobs_BT = worker.logprobs(batch)
        sent += len(pickle.dumps(batch))
        batch.ref_logprobs_BT = worker.logprobs(batch, reference=True)
        middle = time.perf_counter()
        sent += len(pickle.dumps(batch))
        num_tokens, num_seqs = loss_normalisers(batch, scale)
        metrics = worker.train(batch, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
        times["logprobs"].append(middle - start)
        times["train"].append(time.perf_counter() - middle)
        if repeat == 0:
            padded, real = worker.micro_batch_layout().padded_tokens(batch)
            out = {"loss": metrics["loss"], "bytes": sent, "padding_waste": 100 * (1 - real / padded),
                   "logprobs": batch.ref_logprobs_BT, "valid": batch.loss_mask_BT.bool(), "sequences": len(rollouts)}
    out["seconds"] = {phase: min(values) for phase, values in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--truncated", type=float, default=0.035, help="share of responses run on to max_new_tokens")
    parser.add_argument("--max-tokens", type=int, default=2048, help="trainer.max_tokens_per_micro_batch of 'new'")
    parser.add_argument("--unanimous", type=float, default=0.5, help="share of groups with one reward for all")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    if args.worker:
        name, folder = args.worker
        result = run_path(name, Path(folder), repeats=args.repeats, max_tokens=args.max_tokens)
        torch.save(result, Path(folder) / f"result_{name}.pt")
        return
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        folder = Path(tmp)
        torch.save(build_inputs(folder, truncated=args.truncated, unanimous=args.unanimous), folder / "inputs.pt")
        results = {}
        for name in PATHS:
            subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--max-tokens",
                            str(args.max_tokens), "--worker", name, str(folder)], check=True,
                           stderr=subprocess.DEVNULL)
            results[name] = torch.load(folder / f"result_{name}.pt", weights_only=False)  # written by our own child
    old = results["old"]
    old_step = sum(old["seconds"].values())
    print(f"demo step: 16 prompts x 16 responses, {args.truncated:.1%} truncated, {args.unanimous:.0%} of groups "
          f"unanimous, fastest of {args.repeats} repeats; max_tokens_per_micro_batch={args.max_tokens}\n")
    print("| path | flags | sequences | log-probs (old+ref) s | train s | step s | step / old | padding waste "
          "| bytes to policy | bytes / old | loss | max log-prob diff vs old |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        step = sum(r["seconds"].values())
        same_maths = not PATHS[name].drop_zero
        valid = old["valid"]
        diff = f"{float((r['logprobs'][valid] - old['logprobs'][valid]).abs().max()):.1e}" if same_maths else "-"
        loss = f"{r['loss']:.7f}" if same_maths else f"({r['loss']:.7f})"
        flags = ", ".join(k for k, v in asdict(PATHS[name]).items() if v) or "-"
        print(f"| {name} | {flags} | {r['sequences']} | {r['seconds']['logprobs']:.3f} | {r['seconds']['train']:.3f} "
              f"| {step:.3f} | {step / old_step:.2f}x | {r['padding_waste']:.1f}% | {r['bytes'] / 2**20:.2f} MiB "
              f"| {r['bytes'] / old['bytes']:.2f}x | {loss} | {diff} |")


if __name__ == "__main__":
    main()
