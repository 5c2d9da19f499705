"""Expected failures reach the user as one line naming the cause (exit code != 0), not a traceback: bad
input, OSError, a failed worker process; a bug still shows its traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from mmupt_megatron.cli_errors import describe_failure, run_command
from mmupt_megatron.distributed.parallel import run_workers

ROOT = Path(__file__).resolve().parents[2]


def failing_worker(path: str) -> None:
    Path(path).read_text()  # FileNotFoundError inside the worker


def test_a_worker_failure_is_one_line_naming_the_cause(tmp_path, capsys):
    def handler(_):
        run_workers(failing_worker, world_size=1, args=(str(tmp_path / "missing.json"),))

    assert run_command(handler, None, prog="mmupt") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmupt: error: worker failure (rank 0): FileNotFoundError: ")
    assert "missing.json" in err and len(err.splitlines()) == 1


def test_os_errors_name_the_file(tmp_path, capsys):
    assert run_command(lambda _: (tmp_path / "nope" / "x.yaml").read_text(), None, prog="mmupt") == 1
    assert capsys.readouterr().err.strip() == f"mmupt: error: No such file or directory: {tmp_path / 'nope' / 'x.yaml'}"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(TypeError):
        run_command(lambda _: None + 1, None, prog="mmupt")
    assert describe_failure(KeyError("x")) is None


def test_train_into_a_used_folder_from_the_command_line(tmp_path):
    """The whole command: refused before Ray starts, one message, exit code 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    model = tmp_path / "model"
    from tests.tiny_models import make_tiny_qwen2_5_vl

    make_tiny_qwen2_5_vl(model, seed=0)
    done = subprocess.run(
        [sys.executable, "-m", "mmupt_megatron.cli", "train", "demo", f"model.path={model}",
         f"trainer.output_dir={out}", "trainer.resume=never", "logging.progress=false"],
        capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300, check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "trainer.resume=never would overwrite its history" in done.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'
