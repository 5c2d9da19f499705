"""``mmupt plot``: runs side by side in one figure from the command line; folders without metrics and an --out
that is an input are refused in one line naming them.

    .venv/bin/python -m pytest tests/test_plot_cli_on_cpu.py -q
"""

import pytest

from mmupt_megatron.cli import main
from tests.trainer.test_figures_on_cpu import write_run


def test_plot_two_runs_names_panels_and_what_was_left_out(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", gap=False), write_run(tmp_path / "b", gap=False, offset=0.05)
    out = a / "comparison.png"  # into a run's folder: fine
    assert main(["plot", str(a), str(b), "--out", str(out), "--labels", "MM-UPT", "supervised"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"wrote {out}: 2 runs (MM-UPT, supervised); panels: greedy, pass@1, maj@k, reward, vote, "
                          "length")
    assert "  left out: gap (rollout/logprob_gap_mean): no run has it" in printed
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 20_000

    assert main(["plot", str(a), "--out", str(tmp_path / "r.svg"), "--metrics", "reward", "greedy"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'r.svg'}: 1 runs (a); panels: greedy, reward\n")
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(("make", "args", "message"), [
    ("empty", ["{tmp}/empty", "--out", "{tmp}/f.png"], "{tmp}/empty has no metrics.jsonl: not a training run's folder"),
    ("fresh", ["{tmp}/a", "{tmp}/fresh", "--out", "{tmp}/f.png"], "{tmp}/fresh/metrics.jsonl is empty"),
    ("", ["{tmp}/a", "--out", "{tmp}/a/metrics.jsonl"], "--out {tmp}/a/metrics.jsonl is the input RUN_DIR metrics file"),
    ("", ["{tmp}/a", "--out", "{tmp}"], "--out {tmp} contains the input RUN_DIR metrics file 1 {tmp}/a/metrics.jsonl"),
    ("", ["{tmp}/a", "--out", "{tmp}/f.jpg2"], "--out {tmp}/f.jpg2: the figure's format comes from its suffix"),
    ("", ["{tmp}/a", "{tmp}/a", "--out", "{tmp}/f.png", "--labels", "x"], "--labels: 1 names for 2 RUN_DIRs"),
    ("", ["{tmp}/a", "--out", "{tmp}/f.png", "--metrics", "accuracy"], "--metrics: unknown panel 'accuracy'"),
])
def test_plot_refuses_in_one_line_naming_the_cause(tmp_path, capsys, make, args, message):
    write_run(tmp_path / "a")
    if make:
        (tmp_path / make).mkdir()
        if make == "fresh":
            (tmp_path / make / "metrics.jsonl").write_text("")
    assert main(["plot", *(arg.format(tmp=tmp_path) for arg in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmupt: error: {message.format(tmp=tmp_path)}") and len(err.splitlines()) == 1
    assert not (tmp_path / "f.png").exists()
    assert (tmp_path / "a" / "metrics.jsonl").read_text().startswith('{"step": 0')  # the input untouched
