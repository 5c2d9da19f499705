"""The conversion CLI parses both subcommands and reports user errors without a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mmupt_megatron.models.convert_cli import add_convert_subcommands, run_convert

ROOT = Path(__file__).resolve().parents[2]


def test_subcommands_mount_on_a_parser():
    parser = argparse.ArgumentParser()
    add_convert_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hf-to-megatron", "--hf", "a", "--out", "b", "--tp", "2", "--pp", "2"])
    assert (args.hf, args.out, args.tp, args.pp, args.force, args.func) == ("a", "b", 2, 2, False, run_convert)
    args = parser.parse_args(["megatron-to-hf", "--ckpt", "c", "--out", "d", "--force"])
    assert (args.ckpt, args.out, args.tp, args.force) == ("c", "d", None, True)


def test_tool_reports_a_bad_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-megatron", "--hf", str(tmp_path),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "model_type='bert'" in proc.stderr and "Traceback" not in proc.stderr
