"""The ``mmupt launch`` and ``mmupt plan`` subcommands (mounted by ``mmupt_megatron/cli.py``).

    mmupt launch qwen2_5_vl_7b_1n8g_tp2 --cluster configs/clusters/example_slurm.yaml --dryrun trainer.steps=10
    mmupt launch --cluster CLUSTER.yaml -- eval --model /ckpt/hf --data test.parquet   # any mmupt subcommand
    mmupt launch --sweep configs/sweeps/qwen2_5_vl_7b_lr_temperature.yaml --cluster CLUSTER.yaml --dryrun
    mmupt launch --status EXP_ID --cluster CLUSTER.yaml      # also --logs EXP_ID, --cancel EXP_ID
    mmupt plan qwen2_5_vl_72b_8n8g_tp8pp4 [--cluster CLUSTER.yaml] [--mfu 0.16 0.23]

Options and positional words mix freely (``RECIPE --cluster F --dryrun key=value``); everything after ``--``
is the job's ``mmupt`` command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.launch.arch import QWEN2_5_VL, arch_for
from mmupt_megatron.launch.cluster import load_cluster
from mmupt_megatron.launch.planner import Plan, PlanAssumptions, check_fits, plan
from mmupt_megatron.launch.sweep import load_sweep


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    """Positional words -> (recipes, key=value overrides)."""
    return [w for w in words if "=" not in w], [w for w in words if "=" in w]


def _launch(args: argparse.Namespace) -> int:
    from mmupt_megatron.launch import experiment

    follow = [(flag, value) for flag, value in (("--status", args.status), ("--logs", args.logs), ("--cancel", args.cancel)) if value]
    if follow:
        if len(follow) > 1 or args.words or args.job_command or args.sweep or args.dryrun:
            raise ValueError(f"{follow[0][0]} EXP_ID takes no recipe, command, --sweep or --dryrun (and one of "
                             "--status/--logs/--cancel at a time)")
        cluster = load_cluster(args.cluster, args.cluster_set) if args.cluster else None
        flag, exp_id = follow[0]
        action = {"--status": experiment.experiment_status, "--logs": experiment.experiment_logs,
                  "--cancel": experiment.cancel_experiment}[flag]
        print(action(exp_id, cluster=cluster))
        return 0
    if not args.cluster:
        raise ValueError("mmupt launch needs --cluster CLUSTER.yaml (configs/clusters/*.yaml)")
    recipes, overrides = _split(args.words)
    cluster = load_cluster(args.cluster, args.cluster_set)
    if args.sweep:
        if recipes or args.job_command:
            raise ValueError(f"--sweep takes its recipe from the sweep file; drop {recipes or args.job_command}")
        result = experiment.launch_sweep(sweep=load_sweep(args.sweep), cluster=cluster, overrides=overrides, dryrun=args.dryrun)
    elif args.job_command:
        if args.words:
            raise ValueError(f"give either RECIPE [key=value ...] or -- COMMAND, not both (got {args.words} and "
                             f"-- {' '.join(args.job_command)})")
        result = experiment.launch_command(command=args.job_command, cluster=cluster, dryrun=args.dryrun)
    else:
        if len(recipes) != 1:
            raise ValueError(f"mmupt launch takes one RECIPE (or --sweep FILE, or -- COMMAND), got {recipes or 'none'}")
        result = experiment.launch(recipe=recipes[0], cluster=cluster, overrides=overrides, dryrun=args.dryrun)
    print(result if args.dryrun else f"submitted experiment {result}")
    return 0


class _LaunchParser(argparse.ArgumentParser):
    """Options and positionals in any order (``RECIPE --cluster F --dryrun k=v``); the words after ``--`` are
    kept apart as the job's command."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        command = args[args.index("--") + 1:] if "--" in args else []
        args = args[: args.index("--")] if "--" in args else args
        self._inner = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False
        namespace.job_command = command
        return namespace, extras


def format_plan(recipe: str, p: Plan, assumptions: PlanAssumptions) -> str:
    a = p.arch
    layout = "colocated with the policy (offloaded during rollout)" if p.colocated else "on GPUs of their own"
    lines = [
        (f"{recipe}: {a.name} ({a.total_params / 1e9:.2f}B params: LM {a.lm_params / 1e9:.2f}B + ViT "
         f"{a.vision_params / 1e9:.2f}B) on {p.num_gpus} x H100 {assumptions.gpu_memory_gib:g} GiB; "
         f"{p.num_engines} vLLM engine(s) {layout}"),
        f"  training phase, per GPU (GiB)          {p.train_total:7.1f}",
        *(f"    {k:<36}{v:7.1f}" for k, v in p.train_gib.items()),
        f"  log-prob phase, per GPU (GiB)          {sum(p.logprob_gib.values()):7.1f}",
        *(f"    {k:<36}{v:7.1f}" for k, v in p.logprob_gib.items()),
        f"  checkpoint phase, per GPU (GiB)        {sum(p.checkpoint_gib.values()):7.1f}",
        *(f"    {k:<36}{v:7.1f}" for k, v in p.checkpoint_gib.items()),
        f"  rollout phase, per engine GPU (GiB)    {p.rollout_total:7.1f}",
        *(f"    {k:<36}{v:7.1f}" for k, v in p.rollout_gib.items()),
        f"    KV capacity at full length (seqs)   {p.kv_sequences:7.0f}",
        (f"  refit: {p.refit_gb:.1f} GB of bf16 weights to each engine over {p.refit_transport}, "
         f"{p.refit_s[0]:.2f}-{p.refit_s[1]:.2f} s"),
        "  FLOPs per step: " + ", ".join(f"{k} {v / 1e15:,.0f} PF" for k, v in p.flops.items())
        + f"; total {sum(p.flops.values()) / 1e15:,.0f} PF",
        (f"  step time {p.step_s[0]:,.0f}-{p.step_s[1]:,.0f} s: rollout {p.rollout_s[0]:,.0f}-{p.rollout_s[1]:,.0f} s "
         f"(decode at {assumptions.decode_efficiency[0]:.0%}-{assumptions.decode_efficiency[1]:.0%} of "
         f"{assumptions.hbm_gb_per_s / 1000:g} TB/s HBM), training at MFU {assumptions.mfu[1]:.0%}-{assumptions.mfu[0]:.0%} "
         f"of {assumptions.peak_tflops:g} TFLOP/s (mean prompt {assumptions.mean_prompt_tokens} / response "
         f"{assumptions.mean_response_tokens} tokens)"),
    ]
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    recipes, overrides = _split(args.words)
    if not recipes:
        raise ValueError("mmupt plan takes at least one RECIPE")
    num_gpus = load_cluster(args.cluster, args.cluster_set).num_gpus if args.cluster else 0
    assumptions = PlanAssumptions(
        gpu_memory_gib=args.gpu_memory_gib, mfu=(min(args.mfu), max(args.mfu)),
        mean_prompt_tokens=args.prompt_tokens, mean_response_tokens=args.response_tokens,
    )
    refused = []
    for recipe in recipes:
        cfg = load_config(recipe, overrides)
        engine_gpus = 0 if cfg.trainer.colocate else cfg.num_engines() * cfg.rollout.tensor_parallel_size
        if num_gpus and cfg.parallel.world_size + engine_gpus > num_gpus:
            raise ValueError(f"{recipe} needs {cfg.parallel.world_size + engine_gpus} GPUs (TP x PP x DP"
                             f"{' + engines x rollout TP' if engine_gpus else ''}), the cluster has {num_gpus}")
        result = plan(cfg, arch_for(model_path=cfg.model.path, model=args.model), assumptions=assumptions, num_gpus=num_gpus)
        print(format_plan(Path(recipe).stem, result, assumptions), flush=True)
        try:
            check_fits(result, recipe=Path(recipe).stem)
        except ValueError as error:
            refused.append(str(error))
    if refused:
        raise ValueError("\n".join(refused))
    return 0


def add_launch_parser(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="launch a recipe, any mmupt command or a sweep on Slurm or locally with "
                                 "nemo-run; follow it with --status/--logs/--cancel")
    launch.__class__ = _LaunchParser
    launch.add_argument("words", nargs="*", metavar="RECIPE|key=value", help="a recipe, then section.key=value overrides")
    launch.add_argument("--cluster", help="cluster YAML (configs/clusters/*.yaml); required to launch")
    launch.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE", help="override a cluster key")
    launch.add_argument("--sweep", help="sweep YAML: a grid over config keys, one task per point")
    launch.add_argument("--dryrun", action="store_true", help="print the rendered sbatch script(s); submit nothing")
    launch.add_argument("--status", metavar="EXP_ID", help="state of each task of a submitted experiment (a failed "
                        "task shows its log's last lines)")
    launch.add_argument("--logs", metavar="EXP_ID", help="print the logs of a submitted experiment's tasks")
    launch.add_argument("--cancel", metavar="EXP_ID", help="cancel a submitted experiment's tasks")
    launch.epilog = "-- COMMAND ...: run `mmupt COMMAND ...` (eval, synthesize, convert, train) as the job"
    launch.set_defaults(handler=_launch, job_command=[])


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="estimate per-GPU memory, refit bytes, FLOPs and step time on H100s")
    p.add_argument("words", nargs="*", metavar="RECIPE|key=value", help="recipes, then section.key=value overrides")
    p.add_argument("--cluster", help="cluster YAML: plan for its nodes x gpus_per_node GPUs")
    p.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE", help="override a cluster key")
    p.add_argument("--model", default="", choices=["", *QWEN2_5_VL], help="architecture (default: from model.path)")
    p.add_argument("--mfu", type=float, nargs=2, default=[0.16, 0.23], help="MFU range (default: EasyR1's 16-23%%)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt tokens for FLOPs")
    p.add_argument("--response-tokens", type=int, default=512, help="mean response tokens for FLOPs")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU")
    p.set_defaults(handler=_plan)


if __name__ == "__main__":
    sys.exit("run through `mmupt launch` / `mmupt plan`")
