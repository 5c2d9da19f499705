"""Where step metrics go: ``metrics.jsonl`` (always), TensorBoard event files, a progress bar, PNG plots.

    log = MetricsLog(out_dir, tensorboard=True, progress=True, total_steps=60, first_step=0)
    log.write(metrics)            # one dict per step (must contain "step")
    log.close(); plot_metrics(out_dir / "metrics.jsonl", out_dir / "plots")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOTTED = (
    ("reward", "mean reward"),
    ("majority_share", "majority share"),
    ("pseudo_label_accuracy", "pseudo-label accuracy (holdout answers)"),
    ("eval/maj@k", "held-out maj@k"),
    ("eval/pass@1", "held-out pass@1"),
)


def truncate_jsonl(path: Path, *, before_step: int) -> None:
    """Drop logged steps >= ``before_step`` (they are re-run after a resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool, progress: bool, total_steps: int, first_step: int) -> None:
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

    def note(self, message: str) -> None:
        (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


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
