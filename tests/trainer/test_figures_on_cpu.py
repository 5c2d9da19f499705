"""Figures that compare runs (``trainer.figures``), the per-run plots and the demo's comparison figures, on small
run folders written here in the trainer's ``metrics.jsonl`` format.

    .venv/bin/python -m pytest tests/trainer/test_figures_on_cpu.py -q
"""

import json
import logging

import pytest
from matplotlib.colors import to_rgba

from mmupt_megatron.trainer import figures
from mmupt_megatron.trainer.figures import (
    PANEL_NAMES,
    SMOOTH_SPAN,
    as_logged,
    comparison_figure,
    default_labels,
    ema,
    load_run,
)
from mmupt_megatron.trainer.metrics_log import plot_metrics

EVAL_KEYS = ("eval/greedy", "eval/pass@1", "eval/maj@k")


def write_run(folder, *, steps=12, eval_every=5, offset=0.0, labelled=True, gap=True):
    """A run folder whose metrics.jsonl has what the trainer logs: per-step metrics every step, held-out eval/*
    at step 0, every ``eval_every`` steps and the last step."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(steps):
        m = {"step": step, "reward": 0.5 + offset + 0.02 * step + (0.05 if step % 2 else -0.05),
             "majority_share": 0.7 + offset + 0.01 * step, "response_length": 30.0 - 0.5 * step, "no_answer": 0.0,
             "time/rollout": 1.0}
        if labelled:
            m["pseudo_label_accuracy"] = 0.6 + offset + 0.01 * step
        if gap:
            m["rollout/logprob_gap_mean"] = 1e-4 * (1 + step % 3)
        if step == 0 or step == steps - 1 or step % eval_every == 0:
            m.update({"eval/greedy": 0.8 + offset + 0.01 * step, "eval/pass@1": 0.7 + offset + 0.01 * step,
                      "eval/maj@k": 0.85 + offset + 0.01 * step, "eval/pass@k": 0.95})
        lines.append(json.dumps(m))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def two_runs(tmp_path):
    return write_run(tmp_path / "alpha"), write_run(tmp_path / "beta", offset=0.05, labelled=False)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_ema_matches_a_hand_computed_series():
    # alpha 0.5: s0 = 0, s1 = 0.5*1 + 0.5*0, s2 = 0.5*1 + 0.5*0.5, s3 = 0.5*0 + 0.5*0.75
    assert ema([0.0, 1.0, 1.0, 0.0], alpha=0.5) == pytest.approx([0.0, 0.5, 0.75, 0.375])
    # the default: alpha = 2 / (span + 1) with span 10
    a = 2 / (SMOOTH_SPAN + 1)
    assert SMOOTH_SPAN == 10
    assert ema([1.0, 0.0, 0.0]) == pytest.approx([1.0, 1 - a, (1 - a) ** 2])
    assert ema([]) == []
    with pytest.raises(ValueError, match=r"ema: alpha must be in \(0, 1\], got 0"):
        ema([1.0], alpha=0)


def test_the_figure_has_every_panel_one_colour_per_run_and_the_legends(two_runs):
    alpha, beta = (load_run(folder) for folder in two_runs)
    assert (alpha.label, beta.label) == ("alpha", "beta")  # default labels: the folder names
    fig = comparison_figure([alpha, beta])
    try:
        assert list(fig.axes) == list(PANEL_NAMES) and fig.left_out == []
        titles = {name: ax.get_title() for name, ax in fig.axes.items()}
        assert titles == {"greedy": "held-out greedy accuracy", "pass@1": "held-out sampled pass@1",
                          "maj@k": "held-out maj@k", "reward": "mean reward",
                          "vote": "majority share vs pseudo-label accuracy", "length": "response length (tokens)",
                          "gap": "engine - policy log-prob gap (mean)"}
        # one colour per run, the same in every panel, and the two runs' colours differ
        assert to_rgba(fig.colours["alpha"]) != to_rgba(fig.colours["beta"])
        for name, ax in fig.axes.items():
            for label, line in lines_by_label(ax).items():
                run = label.split(":")[0].removesuffix(" (raw)")
                assert to_rgba(line.get_color()) == to_rgba(fig.colours[run]), (name, label)
        # per-step panels: the raw series faint and thin, its EMA bold, equal to ema() of the logged values
        reward = lines_by_label(fig.axes["reward"])
        steps, values = alpha.series("reward")
        assert list(reward["alpha (raw)"].get_ydata()) == values and list(reward["alpha (raw)"].get_xdata()) == steps
        assert list(reward["alpha"].get_ydata()) == pytest.approx(ema(values))
        assert reward["alpha (raw)"].get_alpha() < 0.5 and reward["alpha"].get_alpha() in (None, 1.0)
        assert reward["alpha"].get_linewidth() > reward["alpha (raw)"].get_linewidth()
        # held-out panels: the evaluations as points (0, 5, 10, 11), and each run's step-0 value dashed
        greedy = lines_by_label(fig.axes["greedy"])
        assert list(greedy["alpha"].get_xdata()) == [0, 5, 10, 11]
        assert greedy["alpha"].get_ydata()[-1] == pytest.approx(0.91)
        assert greedy["beta: step 0"].get_linestyle() == "--"
        assert list(greedy["beta: step 0"].get_ydata()) == pytest.approx([0.85, 0.85])
        # the vote panel: majority share solid, pseudo-label accuracy dashed, only for the run that has labels
        vote = lines_by_label(fig.axes["vote"])
        assert vote["alpha: majority share"].get_linestyle() == "-"
        assert vote["alpha: pseudo-label accuracy"].get_linestyle() == "--"
        assert "beta: pseudo-label accuracy" not in vote and "beta: majority share" in vote
        assert [t.get_text() for t in fig.axes["vote"].get_legend().get_texts()] == ["majority share",
                                                                                      "pseudo-label accuracy"]
        # the figure's legend: the runs on its first row, the line key on the second (filled column by column)
        [legend] = fig.figure.legends
        texts = [t.get_text() for t in legend.get_texts()]
        assert [t for t in texts[::2] if t.strip()] == ["alpha", "beta"]
        assert [t for t in texts[1::2] if t.strip()] == ["dashed: held-out at step 0", "raw per step",
                                                         f"EMA (span {SMOOTH_SPAN})"]
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            if text.get_text() in fig.colours:
                assert to_rgba(handle.get_color()) == to_rgba(fig.colours[text.get_text()])
    finally:
        fig.close()


def test_panels_no_run_has_are_left_out_and_said_so(tmp_path):
    runs = [load_run(write_run(tmp_path / name, gap=False, labelled=False)) for name in ("a", "b")]
    fig = comparison_figure(runs)
    try:
        assert "gap" not in fig.axes and fig.left_out == ["gap"]
        assert "left out: gap (rollout/logprob_gap_mean): no run has it" in fig.notes
        assert any(note.startswith("vote: no run has pseudo_label_accuracy") for note in fig.notes)
    finally:
        fig.close()
    fig = comparison_figure(runs, panels=["reward", "greedy,gap"])
    try:
        assert list(fig.axes) == ["greedy", "reward"] and fig.left_out == ["gap"]
    finally:
        fig.close()
    with pytest.raises(ValueError, match=r"--metrics: unknown panel 'acc'; choose from greedy, pass@1"):
        comparison_figure(runs, panels=["acc"])
    with pytest.raises(ValueError, match=r"none of the runs \(a, b\) has a metric of the panels asked for \(gap\)"):
        comparison_figure(runs, panels=["gap"])


def test_a_base_is_one_black_dashed_line_in_the_held_out_panels(two_runs, tmp_path):
    runs = [load_run(folder, label=name) for folder, name in zip(two_runs, ("MM-UPT", "supervised"), strict=True)]
    base = as_logged({"greedy": 0.75, "pass@1": 0.7, "maj@8": 0.8, "pass@8": 0.9})
    assert base == {"eval/greedy": 0.75, "eval/pass@1": 0.7, "eval/maj@k": 0.8, "eval/pass@k": 0.9}
    fig = comparison_figure(runs, base=base, base_label="base", title="t")
    try:
        for name, key in zip(("greedy", "pass@1", "maj@k"), EVAL_KEYS, strict=True):
            lines = lines_by_label(fig.axes[name])
            assert lines["base"].get_linestyle() == "--" and to_rgba(lines["base"].get_color()) == to_rgba("black")
            assert list(lines["base"].get_ydata()) == pytest.approx([base[key]] * 2)
            assert not any(label.endswith(": step 0") for label in lines)  # the base replaces the step-0 lines
        assert "base" in [t.get_text() for t in fig.figure.legends[0].get_texts()]
        path = fig.save(tmp_path / "figs" / "comparison.png")
    finally:
        fig.close()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_a_folder_without_metrics_is_refused_naming_it(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'nothing'} has no metrics.jsonl: not a training run's"):
        load_run(tmp_path / "nothing")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=rf"metrics.jsonl is empty: the run in {tmp_path / 'fresh'} has logged no"):
        load_run(tmp_path / "fresh")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'gone'}: no such run folder"):
        load_run(tmp_path / "gone")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not a JSON line"):
        load_run(tmp_path / "bad")


def test_labels_default_to_folder_names_made_unique_by_their_parent(tmp_path):
    assert default_labels([tmp_path / "s0" / "mmupt", tmp_path / "s1" / "mmupt", tmp_path / "x"]) == [
        "s0/mmupt", "s1/mmupt", "x"]
    runs = [load_run(write_run(tmp_path / name)) for name in ("a", "b")]
    runs[1].label = "a"
    with pytest.raises(ValueError, match=r"two runs share a label \(a, a\)"):
        comparison_figure(runs)


def test_per_run_plots_keep_working_and_a_plotting_error_is_a_warning(tmp_path, monkeypatch, caplog):
    run = write_run(tmp_path / "run")
    written = plot_metrics(run / "metrics.jsonl", run / "plots")
    assert {p.name for p in written} == {"reward.png", "majority_share.png", "pseudo_label_accuracy.png",
                                         "eval_maj_at_k.png", "eval_pass_at_1.png", "overview.png"}
    assert all(p.stat().st_size > 1000 for p in written)

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "comparison_figure", broken)
    with caplog.at_level(logging.WARNING, logger="mmupt_megatron.trainer.metrics_log"):
        written = plot_metrics(run / "metrics.jsonl", tmp_path / "plots2")
    assert "overview.png" not in {p.name for p in written} and len(written) == 5  # the others still written
    [record] = caplog.records
    assert f"{tmp_path / 'plots2'}: plotting failed" in record.getMessage()
    assert "RuntimeError: no display" in record.getMessage()


def test_the_demo_writes_its_comparison_figures_from_this_demos_runs(tmp_path):
    from mmupt_megatron.demo.run import DEMO_RUNS, demo_figure_runs, write_demo_figures

    for folder in ("mmupt", "supervised", "hard_vote", "synthetic_direct"):
        write_run(tmp_path / folder, offset=0.01 * len(folder))
    rows = [{"run": "base", "split": "test", "greedy": 0.75, "pass@1": 0.7, "maj@8": 0.8},
            {"run": DEMO_RUNS["mmupt"][0], "split": "test", "greedy": 0.9},
            {"run": DEMO_RUNS["supervised"][0], "split": "test", "greedy": 0.95},
            {"run": "base", "split": "hard", "greedy": 0.2, "pass@1": 0.2, "maj@8": 0.2},
            {"run": DEMO_RUNS["hard_vote"][0], "split": "hard", "greedy": 0.2}]
    # synthetic_direct is a folder an earlier demo left: not in this demo's rows, not in its figure
    runs, base = demo_figure_runs(tmp_path, rows, "test")
    assert [r.label for r in runs] == ["MM-UPT (no labels)", "supervised GRPO (labels)"]
    assert base == {"eval/greedy": 0.75, "eval/pass@1": 0.7, "eval/maj@k": 0.8}
    printed = write_demo_figures(tmp_path, rows)
    assert printed == [f"figure: {tmp_path / 'comparison.png'}", f"figure: {tmp_path / 'comparison_hard.png'}"]
    assert all((tmp_path / f).stat().st_size > 20_000 for f in ("comparison.png", "comparison_hard.png"))
    # a figure that cannot be drawn is a warning line, never a failed demo
    (tmp_path / "mmupt" / "metrics.jsonl").unlink()
    [printed] = write_demo_figures(tmp_path, [r for r in rows if r["split"] == "test"])  # no hard runs: no figure
    assert printed.startswith(f"warning: figure {tmp_path / 'comparison.png'} not written: ValueError: ")
    assert "has no metrics.jsonl" in printed


def test_demo_runs_evaluate_their_split_during_training(tmp_path):
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.demo.run import DemoPlan, train_overrides

    plan = DemoPlan(out=tmp_path / "demo", overrides=("trainer.eval_every=10",))
    overrides = train_overrides("hard_vote", base=tmp_path / "base", train_file=tmp_path / "hard_train.parquet",
                                plan=plan, extra=[], eval_file=tmp_path / "hard_test.parquet")
    assert f"data.eval_files=[{tmp_path / 'hard_test.parquet'}]" in overrides
    cfg = load_config("demo", overrides)
    assert cfg.data.eval_files == [str(tmp_path / "hard_test.parquet")]
    assert cfg.trainer.eval_every == 10  # the user's overrides win
    assert load_config("demo", []).trainer.eval_every == 30  # the demo's cadence (cost: configs/demo.yaml)
    assert load_config("demo_synthetic", []).trainer.eval_every == 30
    # research harnesses call train_run without a held-out file: no evaluation during training, as before
    assert not any(o.startswith("data.eval_files") for o in train_overrides(
        "x", base=tmp_path, train_file=tmp_path / "t.parquet", plan=plan, extra=[]))
