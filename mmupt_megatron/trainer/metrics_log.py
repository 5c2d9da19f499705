"""Where step metrics go: ``metrics.jsonl`` (always), TensorBoard event files, a progress bar, PNG plots, and
Weights & Biases (``logging.wandb``).

    log = MetricsLog(out_dir, tensorboard=True, progress=True, total_steps=60, first_step=0)
    log.write(metrics)            # one dict per step (must contain "step")
    log.add_plots(plot_metrics(out_dir / "metrics.jsonl", out_dir / "plots"))
    log.close()

With ``wandb=WandbSettings(...)`` (``open_metrics_log`` builds it from ``logging.*``) every dict written also goes
to a W&B run (``dir=out_dir``: ``WANDB_MODE=offline`` keeps it under ``OUTPUT/wandb/``) with the resolved config;
plots are logged as images and the held-out ``eval/*`` metrics of every step as one table when the log closes.
``save_state(checkpoint)`` keeps the run id in ``wandb.json`` there, and a run resumed from that checkpoint
continues the same W&B run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WANDB_STATE_FILE = "wandb.json"

PLOTTED = (
    ("reward", "mean reward"),
    ("majority_share", "majority share"),
    ("pseudo_label_accuracy", "pseudo-label accuracy (holdout answers)"),
    ("eval/maj@k", "held-out maj@k"),
    ("eval/pass@1", "held-out pass@1"),
)


def combine_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """One dict from several (DP ranks, mini-batches): ``*_max`` keys maximised, the others averaged."""
    return {key: max(p[key] for p in parts) if key.endswith("_max") else sum(p[key] for p in parts) / len(parts)
            for key in parts[0]}


def truncate_jsonl(path: Path, *, before_step: int) -> None:
    """Drop logged steps >= ``before_step`` (they are re-run after a resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in kept))


@dataclass(frozen=True, kw_only=True)
class WandbSettings:
    project: str
    entity: str = ""
    name: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    resume_id: str | None = None
    """The run id of the checkpoint a run resumes from: its metrics continue that W&B run."""


class WandbRun:
    """One W&B run: metrics by step, plots as images, the held-out eval metrics as a table at the end."""

    def __init__(self, settings: WandbSettings, out_dir: Path) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ValueError("logging.wandb=true needs the 'wandb' package: pip install 'mmupt-megatron[hub]'") from e
        self.wandb = wandb
        self.run = wandb.init(
            project=settings.project, entity=settings.entity or None, name=settings.name or None,
            group=settings.group or None, tags=list(settings.tags) or None, config=settings.config,
            dir=str(out_dir), id=settings.resume_id, resume="allow" if settings.resume_id else None,
        )
        self.id: str = self.run.id
        self.eval_rows: dict[int, dict[str, float]] = {}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        held_out = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if held_out:
            self.eval_rows[step] = held_out

    def log_plots(self, paths: list[Path]) -> None:
        if paths:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths})

    def finish(self) -> None:
        if self.eval_rows:
            keys = sorted({k for row in self.eval_rows.values() for k in row})
            rows = [[step, *(row.get(k) for k in keys)] for step, row in sorted(self.eval_rows.items())]
            self.run.log({"eval/table": self.wandb.Table(columns=["step", *keys], data=rows)})
        self.run.finish()


def read_wandb_id(checkpoint: Path | None) -> str | None:
    """The W&B run id a checkpoint recorded (None: none, or no checkpoint)."""
    if checkpoint is None or not (checkpoint / WANDB_STATE_FILE).is_file():
        return None
    return json.loads((checkpoint / WANDB_STATE_FILE).read_text()).get("run_id")


class MetricsLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool, progress: bool, total_steps: int, first_step: int,
                 wandb: WandbSettings | None = None) -> None:
        self.path = out_dir / "metrics.jsonl"
        truncate_jsonl(self.path, before_step=first_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=first_step)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="mm-upt", unit="step", dynamic_ncols=True)
        self.wandb = WandbRun(wandb, out_dir) if wandb is not None else None

    def write(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = int(metrics["step"])
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{metrics.get('reward', float('nan')):.3f}",
                majority=f"{metrics.get('majority_share', float('nan')):.3f}",
                tok_s=f"{metrics.get('tokens_per_s', 0.0):.0f}",
            )
            self.bar.update(1)
        if self.wandb is not None:
            self.wandb.log(metrics, step)

    def add_plots(self, paths: list[Path]) -> None:
        """Plots written for this run (to W&B when it is on)."""
        if self.wandb is not None:
            self.wandb.log_plots(paths)

    def save_state(self, checkpoint: Path) -> None:
        """Record what a resume needs to continue this log (the W&B run id) in a checkpoint being written."""
        if self.wandb is not None:
            (checkpoint / WANDB_STATE_FILE).write_text(json.dumps({"run_id": self.wandb.id}) + "\n")

    def note(self, message: str) -> None:
        (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_metrics_log(cfg, out_dir: Path, *, first_step: int, resumed_from: Path | None = None) -> MetricsLog:
    """The trainer's log as ``logging.*`` describes it (``cfg`` is the resolved ``Config``)."""
    lg = cfg.logging
    wandb = None
    if lg.wandb:
        wandb = WandbSettings(project=lg.wandb_project, entity=lg.wandb_entity, name=lg.run_name, group=lg.wandb_group,
                              tags=tuple(lg.wandb_tags), config=dataclasses.asdict(cfg),
                              resume_id=read_wandb_id(resumed_from))
    return MetricsLog(out_dir, tensorboard=lg.tensorboard, progress=lg.progress, total_steps=cfg.trainer.steps,
                      first_step=first_step, wandb=wandb)


def plot_metrics(jsonl: Path, out_dir: Path) -> list[Path]:
    """One PNG per plotted metric present in the log; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in PLOTTED:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key.replace('/', '_').replace('@', '_at_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
