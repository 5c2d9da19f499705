"""Figures that compare training runs side by side, one colour per run in every panel, from their ``metrics.jsonl``.

    mmupt plot RUN_DIR [RUN_DIR ...] --out FIG.png [--metrics PANEL ...] [--labels NAME ...] [--title TEXT]

    runs = [load_run("runs/demo/mmupt", label="MM-UPT"), load_run("runs/demo/supervised")]
    figure = comparison_figure(runs, base={"eval/greedy": 0.93})   # base: optional dashed reference lines
    figure.save("comparison.png"); figure.close()

Panels (``--metrics`` names; a panel no run has a metric of is left out and said so in ``ComparisonFigure.notes``):

    greedy  pass@1  maj@k   held-out greedy accuracy / sampled pass@1 / maj@k (``eval/greedy``, ``eval/pass@1``,
                            ``eval/maj@k``: the trainer's evaluation on ``data.eval_files`` at step 0, every
                            ``trainer.eval_every`` steps and the last step). Each evaluation is a point (not
                            smoothed: it is already a mean over the held-out questions). Dashed: ``base`` when given
                            (black), else each run's own step-0 evaluation in its colour. The trainer evaluates
                            step 0 after that step's update and refit: one update from the start, not the start.
    reward                  mean reward of the step's rollouts (``reward``)
    vote                    majority share (solid) against pseudo-label accuracy (dashed): the label-free run's own
                            diagnostic; where they part, the vote is teaching wrong answers. Pseudo-label accuracy
                            exists only where the training rows carry answers.
    length                  mean response length in tokens (``response_length``)
    gap                     mean engine - policy log-prob gap on the sampled tokens (``rollout/logprob_gap_mean``)

Per-step metrics are drawn raw (faint) and smoothed (bold) by an exponential moving average with
alpha = 2 / (SMOOTH_SPAN + 1) (``ema``). Matplotlib (the ``plots`` extra) is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmupt_megatron.output_dirs import check_apart
from mmupt_megatron.trainer.metrics_log import METRICS_FILE, read_metrics_lines

SMOOTH_SPAN = 10
"""The smoothed lines' exponential moving average: alpha = 2 / (SMOOTH_SPAN + 1) = 0.18, each point about the
last 10 steps (pandas' ``ewm(span=10, adjust=False)``): s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_(t-1)."""
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
DPI = 110
"""Three panels a row at 4.6 inches each: 1520 px wide, text still legible scaled to a README's ~900 px."""
RAW_ALPHA, RAW_WIDTH, SMOOTH_WIDTH = 0.25, 1.0, 2.4
FONT = {"title": 12, "label": 11, "ticks": 10, "legend": 10}


@dataclass(frozen=True)
class Panel:
    name: str
    """What ``--metrics`` calls it."""
    title: str
    keys: tuple[str, ...]
    """``metrics.jsonl`` keys drawn in it (several: one line style each)."""
    held_out: bool = False
    """Held-out evaluation (points every few steps, not smoothed) rather than a per-step metric."""


PANELS = (
    Panel("greedy", "held-out greedy accuracy", ("eval/greedy",), held_out=True),
    Panel("pass@1", "held-out sampled pass@1", ("eval/pass@1",), held_out=True),
    Panel("maj@k", "held-out maj@k", ("eval/maj@k",), held_out=True),
    Panel("reward", "mean reward", ("reward",)),
    Panel("vote", "majority share vs pseudo-label accuracy", ("majority_share", "pseudo_label_accuracy")),
    Panel("length", "response length (tokens)", ("response_length",)),
    Panel("gap", "engine - policy log-prob gap (mean)", ("rollout/logprob_gap_mean",)),
)
PANEL_NAMES = tuple(p.name for p in PANELS)
KEY_NAMES = {"majority_share": "majority share", "pseudo_label_accuracy": "pseudo-label accuracy"}
KEY_STYLES = {"pseudo_label_accuracy": "--"}
"""Line style of a key sharing a panel (default solid)."""


def ema(values: Sequence[float], *, alpha: float | None = None, span: int = SMOOTH_SPAN) -> list[float]:
    """Exponential moving average: s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_(t-1); alpha = 2 / (span + 1)
    unless given (0 < alpha <= 1)."""
    a = alpha if alpha is not None else 2.0 / (span + 1)
    if not 0 < a <= 1:
        raise ValueError(f"ema: alpha must be in (0, 1], got {a}")
    out: list[float] = []
    for value in values:
        out.append(value if not out else a * value + (1 - a) * out[-1])
    return out


@dataclass
class RunMetrics:
    """One run's logged steps (the last line of a step wins), in step order."""

    label: str
    folder: Path
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the steps that logged ``key`` as a finite number."""
        points = [(int(r["step"]), float(r[key])) for r in self.rows
                  if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])


def load_run(folder: str | Path, *, label: str | None = None) -> RunMetrics:
    """A run's ``metrics.jsonl`` (``folder``: a ``trainer.output_dir``, or its metrics file). ValueError
    naming the folder when there is no metrics file or it holds no step; a damaged line is named by
    ``read_metrics_lines``."""
    folder = Path(folder)
    if folder.is_file():  # the metrics file itself
        path, folder = folder, folder.parent
    elif not folder.is_dir():
        raise ValueError(f"{folder}: no such run folder (give a trainer.output_dir that holds {METRICS_FILE})")
    else:
        path = folder / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {METRICS_FILE}: not a training run's folder (trainer.output_dir), or its "
                         "run has not logged a step yet")
    by_step = {step: json.loads(text) for step, text in read_metrics_lines(path)}
    if not by_step:
        raise ValueError(f"{path} is empty: the run in {folder} has logged no step yet")
    return RunMetrics(label=label or folder.resolve().name, folder=folder, rows=[by_step[s] for s in sorted(by_step)])


def default_labels(folders: Sequence[str | Path]) -> list[str]:
    """The runs' folder names; where two are equal, with their parent folder (``a/mmupt``, ``b/mmupt``)."""
    paths = [Path(f).resolve() for f in folders]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def as_logged(metrics: dict[str, float]) -> dict[str, float]:
    """An ``EvalReport``'s metrics (``greedy``, ``pass@1``, ``maj@8``, ...) under the keys the trainer logs them
    (``eval/greedy``, ``eval/pass@1``, ``eval/maj@k``): a base evaluated apart from the runs, as ``base``."""
    k = next((key.split("@")[1] for key in metrics if key.startswith("maj@")), None)
    return {f"eval/{key.replace(f'@{k}', '@k') if k else key}": float(value) for key, value in metrics.items()
            if isinstance(value, int | float)}


@dataclass
class ComparisonFigure:
    figure: Any
    """The matplotlib Figure (the legend of the runs and the line key below the panels)."""
    axes: dict[str, Any]
    """Panel name -> its Axes, for the panels drawn, in ``PANELS`` order."""
    colours: dict[str, Any]
    """Run label -> its colour (the same in every panel)."""
    left_out: list[str] = field(default_factory=list)
    """Panels asked for that no run has a metric of."""
    notes: list[str] = field(default_factory=list)
    """What was left out and why, one line each."""

    def save(self, path: str | Path, *, dpi: int = DPI) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=dpi)
        return path

    def close(self) -> None:
        import matplotlib.pyplot as plt

        plt.close(self.figure)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("figures need matplotlib: pip install 'mmupt-megatron[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def select_panels(names: Sequence[str] | None) -> list[Panel]:
    """The panels named (``--metrics``; commas allowed), in ``PANELS`` order; all of them for None."""
    if names is None:
        return list(PANELS)
    wanted = [n.strip() for name in names for n in name.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in PANEL_NAMES]
    if unknown or not wanted:
        raise ValueError(f"--metrics: unknown panel {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                         f"{', '.join(PANEL_NAMES)}")
    return [p for p in PANELS if p.name in wanted]


def comparison_figure(runs: Sequence[RunMetrics], *, panels: Sequence[str] | None = None,
                      base: dict[str, float] | None = None, base_label: str = "base",
                      title: str | None = None) -> ComparisonFigure:
    """One panel per metric some run has (``panels``: names from ``PANEL_NAMES``, default all), one colour per
    run. ``base``: logged eval keys -> a value drawn as a black dashed line in the held-out panels (then the runs'
    own step-0 lines are not drawn). ValueError when no run has a metric of any panel asked for."""
    if not runs:
        raise ValueError("no runs to plot")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two runs share a label ({', '.join(labels)}): give each run its own name (--labels)")
    chosen = select_panels(panels)
    drawn = [p for p in chosen if any(run.has(key) for run in runs for key in p.keys)]
    left_out = [p.name for p in chosen if p not in drawn]
    notes = [f"left out: {p.name} ({', '.join(p.keys)}): no run has it" for p in chosen if p not in drawn]
    if not drawn:
        raise ValueError(f"none of the runs ({', '.join(labels)}) has a metric of the panels asked for "
                         f"({', '.join(p.name for p in chosen)}): nothing to plot")
    for p in drawn:
        notes += [f"{p.name}: no run has {key}" + (" (judged only where training rows carry answers)"
                                                  if key == "pseudo_label_accuracy" else "")
                  for key in p.keys if not any(run.has(key) for run in runs)]

    plt = _pyplot()
    from matplotlib.lines import Line2D

    palette = plt.get_cmap("tab10").colors
    colours = {run.label: palette[i % len(palette)] for i, run in enumerate(runs)}
    ncols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    cells = [ax for row in grid for ax in row]
    for ax in cells[len(drawn):]:
        ax.remove()
    axes = dict(zip((p.name for p in drawn), cells, strict=False))
    step0_drawn = smoothed_drawn = False
    for panel, ax in zip(drawn, cells, strict=False):
        for key in panel.keys:
            style = KEY_STYLES.get(key, "-")
            suffix = f": {KEY_NAMES[key]}" if len(panel.keys) > 1 else ""
            for run in runs:
                steps, values = run.series(key)
                if not steps:
                    continue
                colour = colours[run.label]
                if panel.held_out:
                    ax.plot(steps, values, color=colour, lw=SMOOTH_WIDTH, marker="o", ms=5, label=run.label)
                    if base is None and steps[0] == 0:
                        ax.axhline(values[0], color=colour, ls="--", lw=1.3, alpha=0.8, label=f"{run.label}: step 0")
                        step0_drawn = True
                    continue
                ax.plot(steps, values, color=colour, ls=style, lw=RAW_WIDTH, alpha=RAW_ALPHA,
                        label=f"{run.label}{suffix} (raw)")
                ax.plot(steps, ema(values), color=colour, ls=style, lw=SMOOTH_WIDTH, label=f"{run.label}{suffix}")
                smoothed_drawn = True
            if panel.held_out and base is not None and key in base:
                ax.axhline(base[key], color="black", ls="--", lw=1.5, label=base_label)
        if len(panel.keys) > 1:
            present = [key for key in panel.keys if any(run.has(key) for run in runs)]
            ax.legend(handles=[Line2D([], [], color="0.35", lw=SMOOTH_WIDTH, ls=KEY_STYLES.get(key, "-"),
                                      label=KEY_NAMES.get(key, key)) for key in present],
                      fontsize=FONT["legend"] - 1, loc="best", framealpha=0.8)
        ax.set_title(panel.title, fontsize=FONT["title"])
        ax.set_xlabel("step", fontsize=FONT["label"])
        ax.tick_params(labelsize=FONT["ticks"])
        ax.grid(alpha=0.3)
    run_handles = [Line2D([], [], color=colours[run.label], lw=SMOOTH_WIDTH + 0.6, label=run.label) for run in runs]
    key_handles = []
    if base is not None and any(p.held_out and any(k in base for k in p.keys) for p in drawn):
        key_handles.append(Line2D([], [], color="black", ls="--", lw=1.5, label=base_label))
    if step0_drawn:
        key_handles.append(Line2D([], [], color="0.4", ls="--", lw=1.3, label="dashed: held-out at step 0"))
    if smoothed_drawn:
        key_handles += [Line2D([], [], color="0.4", lw=RAW_WIDTH, alpha=RAW_ALPHA + 0.15, label="raw per step"),
                        Line2D([], [], color="0.4", lw=SMOOTH_WIDTH, label=f"EMA (span {SMOOTH_SPAN})")]
    fig.legend(handles=_legend_rows(run_handles, key_handles), loc="outside lower center", fontsize=FONT["legend"],
               ncol=max(len(run_handles), len(key_handles)) if len(run_handles) <= 4 else 4, frameon=False)
    if title:
        fig.suptitle(title, fontsize=FONT["title"] + 1)
    return ComparisonFigure(figure=fig, axes=axes, colours=colours, left_out=left_out, notes=notes)


def _legend_rows(runs: list[Any], keys: list[Any]) -> list[Any]:
    """The figure legend's entries: the runs on the first row and the line key on the second (a legend fills its
    columns first: interleaved, padded with blank entries); more than 4 runs: one after another, 4 a row."""
    if len(runs) > 4 or not keys:
        return runs + keys
    from matplotlib.lines import Line2D

    width = max(len(runs), len(keys))
    blank = [Line2D([], [], alpha=0.0, label=" ") for _ in range(2 * width)]
    runs, keys = runs + blank[: width - len(runs)], keys + blank[width : 2 * width - len(keys)]
    return [handle for pair in zip(runs, keys, strict=True) for handle in pair]


def check_figure_out(out: str | Path, run_folders: Sequence[str | Path]) -> Path:
    """ValueError unless ``out`` is a new or replaceable figure file: a .png/.pdf/.svg name, not a folder, not a
    run's metrics file nor a folder holding one (a figure inside a run's folder is fine)."""
    out = Path(out)
    check_apart(out, {f"RUN_DIR metrics file {i + 1}": Path(f) / METRICS_FILE for i, f in enumerate(run_folders)},
                out_label="--out")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a figure file, e.g. {out / 'comparison.png'}")
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise ValueError(f"--out {out}: the figure's format comes from its suffix: use {', '.join(FIGURE_SUFFIXES)}")
    return out


def plot_runs(folders: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
              panels: Sequence[str] | None = None, title: str | None = None) -> ComparisonFigure:
    """``mmupt plot``: check ``out``, read every run, draw, save; the figure is returned closed."""
    out = check_figure_out(out, folders)
    select_panels(panels)  # an unknown name: refused before any run is read
    if labels is not None and len(labels) != len(folders):
        raise ValueError(f"--labels: {len(labels)} names for {len(folders)} RUN_DIRs: give one per RUN_DIR")
    runs = [load_run(f, label=name) for f, name in zip(folders, labels or default_labels(folders), strict=True)]
    figure = comparison_figure(runs, panels=panels, title=title)
    try:
        figure.save(out)
    finally:
        figure.close()
    return figure


def add_plot_subcommand(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser("plot", help="compare training runs in one figure (held-out accuracy over training, "
                                            "reward, vote, response length, log-prob gap)")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (each with metrics.jsonl)")
    plot.add_argument("--out", required=True, help="the figure to write: .png, .pdf or .svg")
    plot.add_argument("--metrics", nargs="+", metavar="PANEL", default=None,
                      help=f"panels to draw (default: every one a run has): {' '.join(PANEL_NAMES)}")
    plot.add_argument("--labels", nargs="+", metavar="NAME", default=None,
                      help="legend names, one per RUN_DIR (default: the folder names)")
    plot.add_argument("--title", default=None, help="a title over the figure")
    plot.set_defaults(handler=_plot_command)


def _plot_command(args: argparse.Namespace) -> int:
    figure = plot_runs(args.runs, args.out, labels=args.labels, panels=args.metrics, title=args.title)
    print(f"wrote {args.out}: {len(figure.colours)} runs ({', '.join(figure.colours)}); panels: "
          f"{', '.join(figure.axes)}")
    for note in figure.notes:
        print(f"  {note}")
    return 0
