"""``mmupt synthesize``: a policy writes new questions about the images of a data file.

    mmupt synthesize --mode in-context --input runs/demo/data/train.parquet \\
        --out runs/demo/synthetic/in_context.parquet --model runs/demo/mmupt/hf \\
        [--recipe demo] [--force] [synthesis.candidates_per_seed=4 synthesis.agreement_high=0.95 ...]

The recipe (default ``mmupt_paper``) gives the data keys and prompt format (``data.*``), how answers are
sampled (``rollout.*``) and the synthesis settings (``synthesis.*``); ``--mode`` sets ``synthesis.mode``.
``--model`` is a Hugging Face folder (an exported run: ``OUTPUT/hf``). The model step written with each row
is read from the run's checkpoint when there is one, else ``synthesis.model_step``.

``--input`` is anything ``data.train_files`` takes (a file, a folder, a Hugging Face dataset ``NAME[@SPLIT]`` or
dataset folder). Writes OUT (parquet, JSONL, or, for an OUT without a suffix, a Hugging Face dataset folder
to share with ``push_to_hub``: the input's row format plus provenance columns; see ``synthesis.rows``) and
``OUT_STEM.summary.json`` with the count of every rejection reason. An existing output is kept unless
``--force``; OUT (or its summary) that is, holds or lies inside ``--input``, or is or holds ``--model``, is
refused, with ``--force`` too, before anything is read; a bad input row is an error naming the file and row (or, with
``data.on_bad_row=skip``, counted).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from mmupt_megatron.algorithms.synthesis import MODES
from mmupt_megatron.config import Config
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.configured import open_dataset
from mmupt_megatron.output_dirs import check_apart
from mmupt_megatron.synthesis.rows import (
    check_output_path,
    summary_path,
    write_result,
    write_summary,
)
from mmupt_megatron.synthesis.run import Progress, SynthesisResult, engine_context, synthesize
from mmupt_megatron.trainer.checkpoint import recorded_model_step

DEFAULT_RECIPE = "mmupt_paper"


def open_engine(model_dir: str | Path, cfg: Config):
    """A vLLM engine serving ``model_dir``, long enough for synthesis prompts and for answers."""
    from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine, engine_kwargs

    if cfg.logging.quiet_engines:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    r, s = cfg.rollout, cfg.synthesis
    max_model_len = engine_context(model_dir, rollout=r, synthesis=s)  # ValueError: longer than the model serves
    return VLLMRolloutEngine(model_dir, **engine_kwargs(r, max_model_len=max_model_len, seed=s.seed))


def _check_unique_ids(samples: Sequence) -> None:
    first: dict[str, str] = {}
    for sample in samples:
        if sample.id in first:
            raise ValueError(f"{sample.origin}: id {sample.id!r} was already used by {first[sample.id]}; "
                             "synthesized rows name their seed by id, so ids must be unique")
        first[sample.id] = sample.origin


def synthesize_file(
    *, source: str | Path, out: str | Path, model: str | Path, cfg: Config, force: bool = False,
    engine=None, progress: Progress | None = print,
) -> SynthesisResult:
    """Read the seed rows of ``source``, synthesize with ``engine`` (a vLLM engine on ``model`` when None), write ``out``."""
    inputs = {"--input": source, "--model": model}
    check_apart(out, inputs, out_label="--out", inside_ok=("--model",))
    check_apart(summary_path(out), inputs, out_label="--out's summary", inside_ok=("--model",))
    out = check_output_path(out, force=force)
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model {model} is not a Hugging Face folder (no config.json); export a checkpoint "
                         "with 'mmupt convert megatron-to-hf' or use a run's OUTPUT/hf")
    if engine is None:  # the model serves prompt + new tokens: checked before the data is read and vLLM starts
        engine_context(model, rollout=cfg.rollout, synthesis=cfg.synthesis)
    dataset = open_dataset([str(source)], cfg.data)
    if dataset.skipped.total and progress is not None:
        progress(f"synthesize: input {dataset.skipped.summary()}")
    _check_unique_ids(dataset.samples)
    step = recorded_model_step(model)
    if step is None:
        step = cfg.synthesis.model_step
    elif cfg.synthesis.model_step is not None and cfg.synthesis.model_step != step and progress is not None:
        progress(f"synthesize: {model} records step {step}; synthesis.model_step={cfg.synthesis.model_step} ignored")
    owned = engine is None
    engine = open_engine(model, cfg) if owned else engine
    try:
        limit = cfg.synthesis.max_seeds or len(dataset.samples)
        result = synthesize(engine.generate, dataset.samples, synthesis=cfg.synthesis, data=cfg.data,
                            rollout=cfg.rollout, indices=range(min(limit, len(dataset.samples))), model_step=step,
                            progress=progress)
    finally:
        if owned:
            engine.close()
    if not result.questions:
        summary = write_summary(out, result)
        raise ValueError(f"no synthesized question passed the filters ({result.describe()}); see {summary}")
    write_result(out, result, seeds=dataset.samples, data=cfg.data)
    return result


def _synthesize_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, [*args.overrides, f"synthesis.mode={args.mode}"])
    result = synthesize_file(source=args.input, out=args.out, model=args.model, cfg=cfg, force=args.force)
    print(result.describe())
    print(f"wrote {args.out} and {summary_path(args.out)}")
    return 0


def add_synthesize_subcommand(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("synthesize", help="write new questions about a data file's images with a policy")
    parser.add_argument("--mode", required=True, choices=MODES, help="in-context (seed question shown) or direct")
    parser.add_argument("--input", required=True, help="seed rows: a parquet / JSONL file or folder, or a Hugging Face "
                                                         "dataset (NAME[@SPLIT] or a dataset folder)")
    parser.add_argument("--out", required=True, help="output file (.parquet or .jsonl), or a folder "
                                                       "(no suffix) written as a Hugging Face dataset")
    parser.add_argument("--model", required=True, help="Hugging Face folder of the policy (e.g. a run's OUTPUT/hf)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe for data/rollout/synthesis settings "
                                                                 f"(default {DEFAULT_RECIPE})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    parser.set_defaults(handler=_synthesize_command)


__all__ = ["add_synthesize_subcommand", "open_engine", "synthesize_file"]
