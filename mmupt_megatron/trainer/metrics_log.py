"""Where step metrics go: ``metrics.jsonl`` (always), TensorBoard event files, a progress bar, PNG plots, and
Weights & Biases (``logging.wandb``).

    log = MetricsLog(out_dir, tensorboard=True, progress=True, total_steps=60, first_step=0)
    log.write(metrics)            # one dict per step (must contain "step")
    log.add_plots(plot_metrics(out_dir / "metrics.jsonl", out_dir / "plots"))   # errors: a logged warning
    log.close()

With ``wandb=WandbSettings(...)`` (``open_metrics_log`` builds it from ``logging.*``) every dict written also goes
to a W&B run (``dir=out_dir``: ``WANDB_MODE=offline`` keeps it under ``OUTPUT/wandb/``) with the resolved config;
plots are logged as images and the held-out ``eval/*`` metrics of every step as one table when the log closes.
``save_state(checkpoint)`` keeps the run id in ``wandb.json`` there, and a run resumed from that checkpoint
continues the same W&B run.

A resume reads these side files again: ``check_resume_files(cfg)`` checks them before Ray starts and the checkpoint
loads (a damaged ``wandb.json`` or a damaged line of ``metrics.jsonl`` is a ValueError naming the file and line).
The one damage a kill leaves, a cut-off last line of ``metrics.jsonl``, is dropped with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WANDB_STATE_FILE = "wandb.json"
METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger(__name__)

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


def _metrics_line(path: Path, number: int, raw: bytes) -> tuple[int, str]:
    """(step, text) of one line of a metrics log; ValueError naming the file and the line."""
    try:
        text = raw.decode("utf-8").rstrip("\r")
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} line {number}: not a JSON line ({error}); the metrics log is damaged: repair or "
                         "delete that line to resume") from None
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        problem = f"not a step's metrics (a JSON object with an integer \"step\"), got {text[:80]!r}"
        raise ValueError(  # noqa: TRY004 - a damaged file is the user's to fix
            f"{path} line {number}: {problem}; the metrics log is damaged: repair or delete that line to resume")
    return step, text


def read_metrics_lines(path: Path, *, warn: bool = True) -> list[tuple[int, str]]:
    """(step, line) of every line of a metrics log. A cut-off last line (no newline, not JSON: what a run killed
    while writing it leaves) is dropped, with a warning when ``warn``; any other damaged line is a ValueError
    naming the file and the line."""
    *lines, last = path.read_bytes().split(b"\n")  # ``last``: what follows the final newline (b"" normally)
    kept = [_metrics_line(path, number, raw) for number, raw in enumerate(lines, 1) if raw.strip()]
    if last.strip():
        try:
            kept.append(_metrics_line(path, len(lines) + 1, last))
        except ValueError:
            if warn:
                logger.warning("%s line %d: cut off (%d bytes, no newline; a run stopped while writing it): dropped, "
                               "its step is re-run", path, len(lines) + 1, len(last))
    return kept


def truncate_jsonl(path: Path, *, before_step: int) -> None:
    """Drop logged steps >= ``before_step`` (they are re-run after a resume), and a cut-off last line."""
    if not path.is_file():
        return
    kept = [line for step, line in read_metrics_lines(path) if step < before_step]
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
    """The W&B run id a checkpoint recorded (None: none, or no checkpoint); ValueError naming a damaged file."""
    path = checkpoint / WANDB_STATE_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return None
    fix = ("it holds the W&B run id a resume continues (logging.wandb=true): write it as {\"run_id\": \"ID\"}, or "
           "delete the file to log the resumed run as a new W&B run")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); {fix}") from None
    run_id = state.get("run_id") if isinstance(state, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"{path}: expected an object with a \"run_id\" string, got {json.dumps(state)[:80]}; {fix}")
    return run_id


def check_resume_files(cfg) -> None:  # cfg: the resolved Config
    """What a resume reads besides the checkpoint, checked before Ray starts and any checkpoint loads:
    ``metrics.jsonl`` and (``logging.wandb``) the ``wandb.json`` of every checkpoint ``trainer.resume`` may load.
    ValueError naming the file (and line); a cut-off last metrics line is left for ``truncate_jsonl`` to drop."""
    from mmupt_megatron.trainer.checkpoint import resume_candidates

    out = Path(cfg.trainer.output_dir)
    candidates = resume_candidates(cfg.trainer.resume, out)
    if not candidates:
        return
    if (out / METRICS_FILE).is_file():
        read_metrics_lines(out / METRICS_FILE, warn=False)
    if cfg.logging.wandb:
        for folder in candidates:
            read_wandb_id(folder)


class MetricsLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool, progress: bool, total_steps: int, first_step: int,
                 wandb: WandbSettings | None = None) -> None:
        self.path = out_dir / METRICS_FILE
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
    """One PNG per plotted metric present in the log, and ``overview.png``: every panel of ``trainer.figures``
    (held-out accuracy, reward, vote, length, log-prob gap; raw and smoothed). Returns the files written. Plots never
    stop a run: an error while plotting is a logged warning naming the folder, and the files written before it are
    returned."""
    written: list[Path] = []
    try:
        _plot_each_metric(jsonl, out_dir, written)
        from mmupt_megatron.trainer.figures import comparison_figure, load_run

        overview = comparison_figure([load_run(jsonl)], title=jsonl.parent.name)
        try:
            written.append(overview.save(out_dir / "overview.png"))
        finally:
            overview.close()
    except Exception as error:  # noqa: BLE001 - a figure is never worth a run
        logger.warning("%s: plotting failed, the run goes on without the rest of its plots (%d written): %s: %s",
                       out_dir, len(written), type(error).__name__, error)
    return written


def _plot_each_metric(jsonl: Path, out_dir: Path, written: list[Path]) -> None:
    """One PNG per metric of ``PLOTTED`` in the log, appended to ``written`` as each is saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(text) for _, text in read_metrics_lines(jsonl, warn=False)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, title in PLOTTED:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        try:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out_dir / f"{key.replace('/', '_').replace('@', '_at_')}.png"
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        written.append(path)
