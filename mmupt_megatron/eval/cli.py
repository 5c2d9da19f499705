"""``mmupt eval``: a checkpoint on a benchmark file -> greedy, pass@1, maj@k, pass@k; a JSON report, a table.

    mmupt eval --model CKPT --data FILE [--benchmark auto|mathvista|wemath|mathverse|mathvision|generic]
               [--images DIR] [--recipe mmupt_paper] [--k 8] [--limit N] [--batch-size 64] [--out REPORT.json]
               [section.key=value ...]

- ``--model``: an HF folder, or a Megatron checkpoint (``mmupt convert hf-to-megatron`` output, or a training
  checkpoint ``OUT/checkpoints/step_NNNNNN``), converted to HF in a temporary folder first.
- ``--data``: a local copy of a benchmark file (see ``mmupt_megatron/eval/benchmarks.py`` for the formats);
  ``--benchmark auto`` (the default) tells the format from the first row's fields. Relative image paths are
  looked up in ``--images DIR``, next to the file, then in its parent folder. A row that cannot be read as
  published stops the run naming file, row and field, or with ``eval.on_bad_row=skip`` is skipped and
  counted by reason (printed, and in the report's ``loading``).
- Before the engine starts, the prompts (image tokens as the model's own processor counts them) are checked
  against ``rollout.max_prompt_length``, and prompt + ``rollout.max_new_tokens`` against the model's context.
- The recipe (default ``mmupt_paper``: T=0.7, top-p 0.99, 2048 + 2048 tokens, Qwen's pixel limits and the
  training instruction) gives sampling (``rollout.*``), the prompt and image settings (``data.*``), answer
  equivalence (``reward.use_math_verify``) and k (``trainer.eval_k``); ``key=value`` overrides it.
- Progress goes to stderr (a bar on a terminal, a line per batch otherwise); the table to stdout; the
  report to ``--out`` (default ``runs/eval/<benchmark>_<data file stem>.json``), which may not be the ``--data``
  file or the ``--model`` folder, nor lie in the ``--data`` or ``--images`` folder: refused before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path

from mmupt_megatron.eval.benchmarks import BENCHMARKS

DEFAULT_RECIPE = "mmupt_paper"


def add_eval_subcommand(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="evaluate a checkpoint on a benchmark file (pass@1, maj@k, pass@k)")
    p.add_argument("--model", required=True, help="HF folder, or a Megatron / training checkpoint (converted)")
    p.add_argument("--data", required=True, help="benchmark file (.json/.jsonl/.parquet; generic: also a folder), or a Hugging Face "
                                                      "dataset: NAME[@SPLIT] or a dataset folder")
    p.add_argument("--benchmark", default="auto", choices=("auto", *BENCHMARKS), help="format (default: detect)")
    p.add_argument("--images", default=None, help="folder the benchmark's relative image paths start from "
                   "(default: the data file's folder, then its parent)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"sampling / prompt / image settings ({DEFAULT_RECIPE})")
    p.add_argument("--k", type=int, default=None, help="samples per question (default: the recipe's trainer.eval_k)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generation call")
    p.add_argument("--out", default=None, help="JSON report path (default runs/eval/<benchmark>_<data stem>.json)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    p.set_defaults(handler=run_eval)


class Progress:
    """``evaluate``'s progress callback: a tqdm bar on a terminal, else one line per batch."""

    def __init__(self, total: int, stream=None):
        from tqdm import tqdm

        self.stream, self.start = stream or sys.stderr, time.perf_counter()
        self.bar = tqdm(total=total, unit="q", desc="eval", file=self.stream) if self.stream.isatty() else None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        else:
            print(f"eval: {done}/{total} questions ({time.perf_counter() - self.start:.0f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_report_path(out: str | Path, args: argparse.Namespace) -> None:
    """ValueError naming both paths if the report would overwrite or land inside what the command reads."""
    from mmupt_megatron.output_dirs import check_apart

    check_apart(out, {"--data": args.data, "--images": args.images, "--model": args.model}, out_label="--out",
                inside_ok=("--model",))


def run_eval(args: argparse.Namespace) -> int:
    if args.out is not None:
        _check_report_path(args.out, args)  # before anything is imported or read
    from mmupt_megatron.algorithms import AnswerMatcher
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.engines.vllm_rollout import (  # installs vLLM's CPU shims
        VLLMRolloutEngine,
        engine_kwargs,
    )
    from mmupt_megatron.eval.benchmarks import detect_benchmark, load_benchmark
    from mmupt_megatron.eval.limits import check_context, engine_limits
    from mmupt_megatron.eval.model import detect_model_format, served_model
    from mmupt_megatron.eval.prompts import check_prompt_lengths, benchmark_items, prompt_lengths
    from mmupt_megatron.eval.report import build_report, markdown_table, write_report
    from mmupt_megatron.eval.evaluator import evaluate

    start = time.perf_counter()
    cfg = load_config(args.recipe, args.overrides)
    r, k = cfg.rollout, args.k if args.k is not None else cfg.trainer.eval_k
    if k < 1 or args.batch_size < 1:
        raise ValueError(f"--k and --batch-size must be >= 1, got {k} and {args.batch_size}")
    benchmark = detect_benchmark(Path(args.data), cfg.data) if args.benchmark == "auto" else args.benchmark
    report_path = Path(args.out) if args.out is not None else Path("runs/eval") / f"{benchmark}_{Path(args.data).stem}.json"
    _check_report_path(report_path, args)
    loaded = load_benchmark(args.data, benchmark, cfg.data, limit=args.limit, on_bad_row=cfg.eval.on_bad_row,
                            images=args.images)
    questions, loading = loaded.questions, loaded.skip_summary()
    items = benchmark_items(questions, cfg.data)
    num_choice = sum(q.choice for q in questions)
    print(f"{len(questions)} {benchmark} questions from {args.data} ({num_choice} multiple choice, "
          f"{len({q.category for q in questions})} categories); k={k}, T={r.temperature}, top-p {r.top_p}", flush=True)
    if loading["skipped"]:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in loading["skipped_by_reason"].items())
        print(f"skipped {loading['skipped']} of {loading['rows_read']} rows (eval.on_bad_row=skip): {reasons}", flush=True)
    if loading["repaired_answers"]:
        print(f"{loading['repaired_answers']} published answers had broken LaTeX escapes (\\frac read as a form feed "
              "+ 'rac'); read with the backslash restored (each is listed in the report's question meta)", flush=True)
    timings = {"load": time.perf_counter() - start}
    kind, folder = detect_model_format(args.model)
    if kind == "megatron":
        print(f"converting the Megatron checkpoint {folder} to an HF folder ...", flush=True)
    with served_model(args.model) as served:
        from transformers import AutoTokenizer

        limits = engine_limits(served.path)
        max_model_len = check_context(limits, max_prompt_length=r.max_prompt_length, max_new_tokens=r.max_new_tokens,
                                      model=args.model)
        lengths = prompt_lengths(questions, items, cfg.data, AutoTokenizer.from_pretrained(served.path), limits.pixels)
        check_prompt_lengths(questions, lengths, max_prompt_length=r.max_prompt_length)
        timings["convert"] = served.convert_s
        tick = time.perf_counter()
        engine = VLLMRolloutEngine(served.path, **engine_kwargs(r, max_model_len=max_model_len))
        timings["engine_start"] = time.perf_counter() - tick
        progress = Progress(len(items))
        tick = time.perf_counter()
        try:
            result = evaluate(engine.generate, items, k=k, temperature=r.temperature, top_p=r.top_p,
                              max_new_tokens=r.max_new_tokens, seed=r.seed, batch_size=args.batch_size, progress=progress,
                              matcher=AnswerMatcher(use_math_verify=cfg.reward.use_math_verify,
                                                    timeout_s=cfg.reward.verify_timeout_s))
        finally:
            progress.close()
            engine.close()
        timings["generate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    config = {
        "recipe": args.recipe, "overrides": list(args.overrides), "created": datetime.now().isoformat(timespec="seconds"),
        "eval": {"k": k, "limit": args.limit, "batch_size": args.batch_size, "max_prompt_tokens": max(lengths)},
        "resolved": dataclasses.asdict(cfg),
    }
    report = build_report(result=result, questions=questions, benchmark=benchmark, data=str(args.data), model=served,
                          config=config, timings=timings, loading=loading)
    out = write_report(report, report_path)
    print(markdown_table(report))
    print(f"report: {out} ({timings['total']:.0f} s)", flush=True)
    return 0
