"""Step time of the GRPO update, old path vs new, on a demo-size step (issue 12).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_time.py [--repeats 3] [--truncated 0.035] [--max-tokens 2048]

The batch is the demo recipe's (configs/demo.yaml): the demo's model architecture (``mmupt_megatron.demo.model``,
built untrained with seed 0; KL on, so a reference model too), 16 prompts of the demo world (84 x 84 images)
x 16 responses. The responses are each question's labelled answer chain (the demo's response format, ~22
tokens), a ``--truncated`` share of them (3.5% measured in the demo's step 1) run on to ``rollout.max_new_tokens``
as a truncated response would. Advantages are group-normalised rewards of a random vote (seed 0).

Each path runs in a fresh process with one policy rank (world 1, gloo, one thread), exactly the worker the
trainer's Ray actors hold: old log-probs, reference log-probs, then one optimizer step, ``--repeats`` times
(the table shows the fastest repeat of each phase; the loss and log-probs are the first repeat's, from the same
initial weights). Bytes are what the driver pickles for the workers over the step's three calls (Ray's
serialisation carries the same tensors).

Paths (rows): ``old``: one image copy per sample, ``trainer.micro_batch_size`` sequences per micro-batch padded to
the batch's longest (the code before issue 12); ``new``: each prompt's image once and
``trainer.max_tokens_per_micro_batch`` micro-batches grouped by length. A later feature becomes a row by adding a
``StepPath`` to ``PATHS`` with its flag (for instance skipping the old-log-prob forward when on-policy, or dropping
zero-advantage groups: ``step`` then honours the flag) — ratios are always against ``old``.
Target: the new step at most 0.6x the old one's time, with the same loss (1e-5) where the maths is unchanged.

Measured (2-core CPU shared with other jobs, 2026-12-01, ``--repeats 5``, default budget 2048):

| path | flags | log-probs (old+ref) s | train s | step s | step / old | padding waste | bytes to policy | bytes / old | loss | max log-prob diff vs old |
|---|---|---|---|---|---|---|---|---|---|---|
| old | - | 1.099 | 1.099 | 2.197 | 1.00x | 25.6% | 125.23 MiB | 1.00x | -0.0031390 | 0.0e+00 |
| new | images_once, token_budget | 0.696 | 0.829 | 1.525 | 0.69x | 2.5% | 8.94 MiB | 0.07x | -0.0031390 | 0.0e+00 |

Budget 4096: 0.57x and 0.69x in two runs (6.5% padding waste). The forwards are matmul-bound: the new step
costs about what its tokens do (13.1k computed vs 17.2k, of 12.8k real), so images once + the budget alone stay
above the 0.6x target on this batch; the rows for the on-policy skip and zero-advantage dropping are the rest.
"""

from __future__ import annotations

import argparse
import json
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


PATHS = {"old": StepPath(), "new": StepPath(images_once=True, token_budget=True)}


def build_inputs(folder: Path, *, truncated: float, seed: int = 0) -> dict:
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
        for s in range(cfg.rollout.n):
            response = chain[: cfg.rollout.max_new_tokens]
            if rng.random() < truncated:
                response = (chain * cfg.rollout.max_new_tokens)[: cfg.rollout.max_new_tokens]
            rollouts.append(Rollout(group_id=p, prompt_index=p, sample_index=s, prompt_token_ids=prompt,
                                    response_token_ids=response, response_logprobs=[0.0] * len(response), text="",
                                    finish_reason="length" if len(response) == cfg.rollout.max_new_tokens else "stop"))
            rewards.append(float(rng.random() < 0.8))
    advantages = group_advantages(rewards, [r.group_id for r in rollouts], estimator=cfg.algorithm.advantage,
                                  normalize_std=cfg.algorithm.normalize_std)
    return {"rollouts": rollouts, "images": images, "advantages": torch.as_tensor(advantages, dtype=torch.float32),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}


def run_path(name: str, folder: Path, *, repeats: int, max_tokens: int) -> dict:
    """One path in this process: ``repeats`` steps; times per phase, bytes, padding, loss, first log-probs."""
    import torch

    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.distributed.parallel import ParallelDims, free_port
    from mmupt_megatron.engines.micro_batching import padded_tokens
    from mmupt_megatron.trainer.batching import pack_rollouts
    from mmupt_megatron.trainer.cluster import policy_optim_config
    from mmupt_megatron.trainer.workers import PolicyWorker

    torch.set_num_threads(1)
    path = PATHS[name]
    cfg = load_config("demo", [f"model.path={folder}"]
                      + ([f"trainer.max_tokens_per_micro_batch={max_tokens}"] if path.token_budget else []))
    inputs = torch.load(folder / "inputs.pt", weights_only=False)
    worker = PolicyWorker(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), dims=ParallelDims(),
                          model_dir=str(folder), optim=policy_optim_config(cfg),
                          with_reference=cfg.algorithm.loss.kl_coef > 0, seed=cfg.trainer.seed)
    times: dict[str, list[float]] = {"logprobs": [], "train": []}
    out: dict = {}
    for repeat in range(repeats):
        start = time.perf_counter()
        batch = pack_rollouts(inputs["rollouts"], pad_id=inputs["pad_id"], images=inputs["images"],
                              advantages_B=inputs["advantages"], images_once=path.images_once)
        sent = len(pickle.dumps(batch))
        batch.old_logprobs_BT = worker.logprobs(batch)
        sent += len(pickle.dumps(batch))
        batch.ref_logprobs_BT = worker.logprobs(batch, reference=True)
        middle = time.perf_counter()
        sent += len(pickle.dumps(batch))
        metrics = worker.train(batch, global_num_tokens=int(batch.loss_mask_BT.sum()),
                               global_num_seqs=batch.input_ids_BT.shape[0])
        times["logprobs"].append(middle - start)
        times["train"].append(time.perf_counter() - middle)
        if repeat == 0:
            padded, real = padded_tokens(batch, max_tokens=cfg.trainer.max_tokens_per_micro_batch,
                                         multiple=worker.sequence_multiple())
            out = {"loss": metrics["loss"], "bytes": sent, "padding_waste": 100 * (1 - real / padded),
                   "logprobs": batch.old_logprobs_BT, "valid": batch.loss_mask_BT.bool()}
    out["seconds"] = {phase: min(values) for phase, values in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--truncated", type=float, default=0.035, help="share of responses run on to max_new_tokens")
    parser.add_argument("--max-tokens", type=int, default=2048, help="trainer.max_tokens_per_micro_batch of 'new'")
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
        torch.save(build_inputs(folder, truncated=args.truncated), folder / "inputs.pt")
        results = {}
        for name in PATHS:
            subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--max-tokens",
                            str(args.max_tokens), "--worker", name, str(folder)], check=True,
                           stderr=subprocess.DEVNULL)
            results[name] = torch.load(folder / f"result_{name}.pt", weights_only=False)
    old = results["old"]
    old_step = sum(old["seconds"].values())
    print(f"demo step: 16 prompts x 16 responses, {args.truncated:.1%} truncated, fastest of {args.repeats} repeats; "
          f"new: max_tokens_per_micro_batch={args.max_tokens}\n")
    print("| path | flags | log-probs (old+ref) s | train s | step s | step / old | padding waste | bytes to policy "
          "| bytes / old | loss | max log-prob diff vs old |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        step = sum(r["seconds"].values())
        valid = old["valid"]
        diff = float((r["logprobs"][valid] - old["logprobs"][valid]).abs().max())
        flags = ", ".join(k for k, v in asdict(PATHS[name]).items() if v) or "-"
        print(f"| {name} | {flags} | {r['seconds']['logprobs']:.3f} | {r['seconds']['train']:.3f} | {step:.3f} "
              f"| {step / old_step:.2f}x | {r['padding_waste']:.1f}% | {r['bytes'] / 2**20:.2f} MiB "
              f"| {r['bytes'] / old['bytes']:.2f}x | {r['loss']:.7f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
