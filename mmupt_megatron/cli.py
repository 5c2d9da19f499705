"""The ``mmupt`` command line.

    mmupt config show RECIPE [section.key=value ...]   # print the resolved, validated config
    mmupt config keys                                    # every key with its documentation
    mmupt train RECIPE [section.key=value ...]        # MM-UPT training (Ray + Megatron + vLLM)
    mmupt convert hf-to-megatron --hf DIR --out DIR --tp N --pp M
    mmupt convert megatron-to-hf --ckpt DIR --out DIR
    mmupt eval --model CKPT --data FILE [--benchmark mathvista|wemath|mathverse|mathvision|generic] [--k 8]
    mmupt launch RECIPE --cluster CLUSTER.yaml [--dryrun] [section.key=value ...]   # nemo-run: Slurm + Ray, local
    mmupt plan RECIPE [--cluster CLUSTER.yaml]        # per-GPU memory, FLOPs, step time on H100s
    mmupt synthesize --mode in-context|direct --input DATA --out DATA --model HF_DIR [--recipe R] [key=value ...]
    mmupt plot RUN_DIR [RUN_DIR ...] --out FIG.png [--metrics PANEL ...] [--labels NAME ...]   # runs side by side

More subcommands (train, eval, synthesize, convert, launch, plan) are mounted here as they land.
"""

from __future__ import annotations

import argparse
import sys

from mmupt_megatron.cli_errors import run_command
from mmupt_megatron.config_docs import describe_keys
from mmupt_megatron.demo.run import add_demo_subcommand
from mmupt_megatron.eval.cli import add_eval_subcommand
from mmupt_megatron.models.convert_cli import add_convert_subcommands
from mmupt_megatron.config_loading import config_to_yaml, load_config
from mmupt_megatron.launch.cli import add_launch_parser, add_plan_parser
from mmupt_megatron.synthesis.cli import add_synthesize_subcommand
from mmupt_megatron.trainer.figures import add_plot_subcommand


def _config_show(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    for key, type_name, default, doc in describe_keys():
        print(f"{key} ({type_name}, default {default!r})\n    {doc}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmupt_megatron.trainer.loop import Trainer

    cfg = load_config(args.recipe, args.overrides)
    print(config_to_yaml(cfg), end="", flush=True)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.cluster.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmupt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="inspect recipes").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config of a recipe")
    show.add_argument("recipe", help="a YAML path or a name in configs/ (e.g. demo)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.set_defaults(handler=_config_show)
    keys = config.add_parser("keys", help="list every config key with its documentation")
    keys.set_defaults(handler=_config_keys)
    add_demo_subcommand(commands)
    train = commands.add_parser("train", help="train a policy with MM-UPT")
    train.add_argument("recipe", help="a YAML path or a name in configs/")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.set_defaults(handler=_train)
    convert = commands.add_parser("convert", help="convert checkpoints between HF and Megatron")
    add_convert_subcommands(convert.add_subparsers(dest="direction", required=True))
    add_eval_subcommand(commands)
    add_launch_parser(commands)
    add_plan_parser(commands)
    add_synthesize_subcommand(commands)
    add_plot_subcommand(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Expected failures (bad input, OSError, worker and Ray errors) print one line and exit non-zero."""
    args = build_parser().parse_args(argv)
    return run_command(getattr(args, "handler", None) or args.func, args, prog="mmupt")


if __name__ == "__main__":
    sys.exit(main())
