"""Two trainings on one trainer.output_dir would delete each other's ``.tmp`` checkpoints: the folder is held by
one run at a time (``.mmupt.lock``, created exclusively and flocked for the run's life). A second run is refused at
once naming the owner's host and pid; a lock left by a dead process of this host is taken over with a warning; a
lock of another host, or of a live pid, is never taken over; the lock goes when released, collected or on fit's end;
``--force`` / the demo never delete a folder a live run holds. Pure Python: no Ray, no model."""

import gc
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmupt_megatron.output_dirs import LOCK_FILE, RunLock, lock_holder, mark_owned, remove_owned
from mmupt_megatron.trainer.run_dir import releases_output_dir

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys; from mmupt_megatron.output_dirs import RunLock; lock = RunLock.take(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def other_run(tmp_path):
    """Another process holding ``tmp_path / 'run'`` until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_naming_the_owner(tmp_path, other_run):
    host = socket.gethostname()
    with pytest.raises(ValueError, match=rf"trainer.output_dir={tmp_path / 'run'} is in use by another training run "
                                         rf"\(host {host}, pid {other_run.pid}, since .*; lock .*{LOCK_FILE}\): wait for "
                                         "it to finish, or choose another trainer.output_dir"):
        RunLock.take(tmp_path / "run")
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == other_run.pid  # untouched
    assert lock_holder(tmp_path / "run")["pid"] == other_run.pid


def test_the_same_folder_twice_in_one_process_is_refused_too(tmp_path):
    first = RunLock.take(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"is in use by another training run of this process \(pid {os.getpid()}; "):
        RunLock.take(tmp_path / "run")
    first.release()
    RunLock.take(tmp_path / "run").release()


def test_released_closed_or_collected_the_folder_is_free(tmp_path):
    lock = RunLock.take(tmp_path / "run")
    assert lock.held and (tmp_path / "run" / LOCK_FILE).is_file()
    lock.release()
    lock.release()  # twice: nothing happens
    assert not lock.held and not (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock.take(tmp_path / "run"):
        assert lock_holder(tmp_path / "run")["pid"] == os.getpid()
    assert lock_holder(tmp_path / "run") is None
    collected = RunLock.take(tmp_path / "run")
    del collected
    gc.collect()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_fit_releases_the_folder_when_it_returns_or_raises(tmp_path):
    class Fits:
        def __init__(self, fail):
            self.run_lock, self.fail = RunLock.take(tmp_path / "run"), fail

        @releases_output_dir
        def fit(self):
            assert lock_holder(tmp_path / "run")["pid"] == os.getpid()
            if self.fail:
                raise RuntimeError("step 3 failed")
            return ["history"]

    done = Fits(fail=False)
    assert done.fit() == ["history"] and not done.run_lock.held
    failed = Fits(fail=True)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        failed.fit()
    assert not failed.run_lock.held and not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    pid = dead_pid()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="mmupt_megatron.output_dirs"):
        lock = RunLock.take(tmp_path / "run")
    assert f"taking over the lock {tmp_path / 'run' / LOCK_FILE} left by a run that is gone (host " in caplog.text
    assert f"pid {pid}, since then)" in caplog.text
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_run_killed_while_holding_the_folder_leaves_a_lock_the_next_run_takes_over(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).is_file()  # SIGKILL: nothing removed it
    with caplog.at_level(logging.WARNING, logger="mmupt_megatron.output_dirs"):
        RunLock.take(tmp_path / "run").release()
    assert f"pid {proc.pid}" in caplog.text and "taking over" in caplog.text


def test_a_lock_of_another_host_or_of_a_live_pid_is_not_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    lock_file = tmp_path / "run" / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "then"}))
    with pytest.raises(ValueError, match=rf"has the lock of a run on another host \(host node-7, pid 4242, since then; "
                                         rf"lock {lock_file}\): if that run is over, delete {lock_file}"):
        RunLock.take(tmp_path / "run")
    parent = os.getppid()  # alive, not us, and holds no flock on the file: a reused pid or not an mmupt run
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": parent, "started": "then"}))
    with pytest.raises(ValueError, match=rf"has the lock of process {parent}, which is alive on this host"):
        RunLock.take(tmp_path / "run")
    assert json.loads(lock_file.read_text())["pid"] == parent  # left as it was


def test_without_flock_on_the_filesystem_the_owner_record_decides(tmp_path, other_run, monkeypatch, caplog):
    """Lustre mounted without -o flock, some NFS: flock fails with ENOSYS; the lock file, created exclusively,
    still keeps a second run out while its owner lives, and is taken over once it is dead."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(ValueError, match=rf"has the lock of process {other_run.pid}, which is alive on this host"):
        RunLock.take(tmp_path / "run")
    assert lock_holder(tmp_path / "run")["pid"] == other_run.pid
    with RunLock.take(tmp_path / "fresh"):
        assert json.loads((tmp_path / "fresh" / LOCK_FILE).read_text())["pid"] == os.getpid()
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    assert lock_holder(tmp_path / "dead") is None
    with caplog.at_level(logging.WARNING, logger="mmupt_megatron.output_dirs"):
        RunLock.take(tmp_path / "dead").release()
    assert "taking over" in caplog.text


def test_force_and_the_demo_never_delete_a_folder_a_live_run_holds(tmp_path, other_run):
    from mmupt_megatron.trainer.preflight import remove_previous_run

    out = tmp_path / "run"
    mark_owned(out, kind="train")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match=rf"trainer.output_dir {out} is in use by a running training \(host .*, pid "
                                         rf"{other_run.pid}, since .*\): it is not deleted"):
        remove_previous_run(out)
    with pytest.raises(ValueError, match=rf"--out {out} is in use by a running training"):
        remove_owned(out, out_label="--out")
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_a_second_trainer_is_refused_before_ray_naming_the_owner(tmp_path, other_run):
    import ray

    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.loop import Trainer
    from tests.tiny_models import make_tiny_qwen2_5_vl

    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    cfg = load_config("demo", [f"model.path={model}", f"trainer.output_dir={tmp_path / 'run'}",
                               f"data.train_files=[{tmp_path / 'none.parquet'}]"])
    with pytest.raises(ValueError, match=rf"trainer.output_dir={tmp_path / 'run'} is in use by another training run "
                                         rf"\(host {socket.gethostname()}, pid {other_run.pid}, since"):
        Trainer(cfg)
    assert not ray.is_initialized()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written by the second run


def test_a_refused_trainer_leaves_no_lock_behind(tmp_path):
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.loop import Trainer

    with pytest.raises(ValueError, match=r"model.path=.*no_model: no such folder"):
        Trainer(load_config("demo", [f"model.path={tmp_path / 'no_model'}", f"trainer.output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock.take(tmp_path / "run").release()
