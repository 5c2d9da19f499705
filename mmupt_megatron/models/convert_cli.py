"""``convert`` subcommands (hf-to-megatron, megatron-to-hf) for argparse; mounted by the main CLI as
``mmupt convert ...`` and by ``tools/convert_checkpoint.py``."""

from __future__ import annotations

import argparse
import time


def add_convert_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``hf-to-megatron`` and ``megatron-to-hf`` parsers; each sets ``func`` to its handler."""
    to_meg = subparsers.add_parser("hf-to-megatron", help="HF Qwen2 / Qwen2.5-VL folder -> Megatron dist-checkpoint")
    to_meg.add_argument("--hf", required=True, help="HF checkpoint folder (config.json + *.safetensors)")
    to_meg.add_argument("--out", required=True, help="output Megatron checkpoint folder (empty or new; never the input, "
                        "inside it, or around it)")
    to_meg.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the workers")
    to_meg.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree of the workers")
    to_meg.add_argument("--force", action="store_true", help="replace an earlier conversion's output (only a folder "
                        "mmupt wrote: it has a .mmupt-output marker)")
    to_meg.set_defaults(func=run_convert)
    to_hf = subparsers.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF folder transformers loads")
    to_hf.add_argument("--ckpt", required=True, help="Megatron checkpoint folder made by hf-to-megatron / training")
    to_hf.add_argument("--out", required=True, help="output HF folder (empty or new; never the checkpoint, inside it, "
                       "or around it)")
    to_hf.add_argument("--tp", type=int, default=None, help="TP of the workers (default: the checkpoint's)")
    to_hf.add_argument("--pp", type=int, default=None, help="PP of the workers (default: the checkpoint's)")
    to_hf.add_argument("--force", action="store_true", help="replace an earlier conversion's output (only a folder "
                       "mmupt wrote: it has a .mmupt-output marker)")
    to_hf.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Handler for both subcommands (dispatches on which of --hf / --ckpt is present)."""
    from mmupt_megatron.models.convert import hf_to_megatron, megatron_to_hf

    start = time.perf_counter()
    if getattr(args, "hf", None) is not None:
        out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, force=args.force)
    else:
        out = megatron_to_hf(args.ckpt, args.out, force=args.force, tp=args.tp, pp=args.pp)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__)
    add_convert_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from mmupt_megatron.cli_errors import run_command

    return run_command(args.func, args, prog=parser.prog)
