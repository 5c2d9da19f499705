"""Research harness: one demo training run repeated over GRPO seeds, to tell run-to-run variance from a bad set.

Trains ``mmupt train demo`` (the product stack: Megatron policy, vLLM engine, Ray) from a demo's base on one
parquet file (default: the demo's direct-question set) once per ``--seeds`` value (``trainer.seed`` /
``rollout.seed``), and evaluates each on the demo's held-out test split with the demo's evaluation seed.

Measured (2026-12-01, seed 1's demo at 8e7a95a, base greedy 0.910 / pass@1 0.875 / maj@8 0.914): the demo's own
run (GRPO seed 1) on its direct questions ended at 0.891 / 0.876 / 0.891; GRPO seeds 11 and 12 on the same set at
0.945 / 0.931 / 0.949 and 0.938 / 0.923 / 0.941 (seed 11 rerun with this script: the same digits). About 3
minutes a seed on a 2-core box.

Measured with it (2026-12-01, the same demos' bases; greedy / pass@1 / maj@8), which set the demo's recipe:
- seed 2's direct questions (base 0.863 / 0.862 / 0.863), GRPO seeds 2 / 21 / 22, 40 steps at lr 5e-5: the loss
  averaged over the trained groups only (``algorithm.loss_over=trained``) 0.852 / 0.847 / 0.852 for seed 2; with
  every group trained (``algorithm.drop_zero_advantage_groups=false``) 0.934 / 0.906 / 0.926 greedy; over the full
  batch with groups dropped (``loss_over=batch``) 0.934 / 0.926 / 0.926 greedy, pass@1 0.925 / 0.922 / 0.918;
- lr 1e-4 (``loss_over=batch``, 40 steps) from seed 0's base on the dataset's questions: GRPO seeds 0 / 1 / 2 ended
  at greedy 1.000 / 0.395 / 1.000 (seed 1: pseudo-labels right in 0.94 -> 0.38 of groups); at 5e-5 for 60 steps
  seed 1 reached 1.000;
- seed 1's direct questions (base 0.910 / 0.875 / 0.914), GRPO seed 1 at 5e-5: 0.910 / 0.899 / 0.914 after 40
  steps, 0.938 / 0.924 / 0.945 after 60.

Run (from the repository root, after ``mmupt demo --synthetic --seed 1 --out runs/demo_s1``):
    .venv/bin/python -m research.grpo_seeds --demo runs/demo_s1 --seeds 11 12 [--train-file FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", required=True, type=Path, help="a demo's output folder (base, data, synthetic)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--train-file", type=Path, default=None, help="default: DEMO/synthetic/direct.parquet")
    parser.add_argument("--eval-seed", type=int, default=None, help="default: the demo's seed (its folder's last digit)")
    parser.add_argument("--out", type=Path, default=None, help="default: DEMO/grpo_seeds")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. trainer.lr=3e-5")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.demo.run import DemoPlan, evaluate_model, train_run
    from mmupt_megatron.eval.evaluator import held_out_items

    train_file = args.train_file or args.demo / "synthetic" / "direct.parquet"
    for path in (args.demo / "base" / "config.json", args.demo / "data" / "test.parquet", train_file):
        if not path.is_file():
            raise SystemExit(f"grpo_seeds: {path} does not exist (run `mmupt demo --synthetic` first)")
    eval_seed = args.eval_seed if args.eval_seed is not None else int(args.demo.name[-1])
    out = args.out or args.demo / "grpo_seeds"
    cfg = load_config("demo", list(args.overrides))
    items = held_out_items([str(args.demo / "data" / "test.parquet")], cfg.data)
    results = []
    for seed in args.seeds:
        plan = DemoPlan(out=out / f"seed{seed}", seed=seed, overrides=tuple(args.overrides))
        plan.out.mkdir(parents=True, exist_ok=True)
        model = train_run(train_file.stem, base=args.demo / "base", train_file=train_file, plan=plan, extra=[])
        metrics = evaluate_model(model, items, cfg=cfg, seed=eval_seed).metrics
        results.append({"grpo_seed": seed, **{k: metrics[k] for k in ("greedy", "pass@1", f"maj@{cfg.trainer.eval_k}")}})
        print(f"GRPO seed {seed}: {results[-1]}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
