"""Reaching Ray: `wait_for_ray --timeout` is a real deadline (nothing listening, or a port that accepts and
never answers); `connect_ray` makes the token-auth choice `ray start --head` made; a local run starts its own
Ray, listening on loopback only, even when an address of another cluster is in the environment."""

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from mmupt_megatron.config_loading import CONFIG_DIR

REPO = CONFIG_DIR.parent


def wait_for_ray(address: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mmupt_megatron.launch.wait_for_ray", "--address", address,
                           "--timeout", str(timeout)], capture_output=True, text=True, check=False, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return done, time.monotonic() - start


def test_deadline_holds_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    done, seconds = wait_for_ray(f"127.0.0.1:{port}", timeout=4)
    assert done.returncode == 1 and "timed out after 4 s" in done.stderr, done.stderr
    assert "nothing listens at" in done.stdout
    assert seconds < 4 + 15


def test_deadline_holds_when_the_port_never_answers():
    with socket.socket() as sock:  # accepts connections into its backlog, never speaks
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        done, seconds = wait_for_ray(f"127.0.0.1:{sock.getsockname()[1]}", timeout=8)
    assert done.returncode == 1 and "timed out after 8 s" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert seconds < 8 + 30  # python start-up and imports, not ray.init's own minutes


def test_connect_ray_turns_token_auth_on_like_ray_start(tmp_path):
    """With a token in ~/.ray and RAY_AUTH_MODE unset, connect_ray enables token mode before ray.init."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef0123456789abcdef")
    code = ("import os, ray\n"
            "from mmupt_megatron.trainer import cluster\n"
            "ray.init = lambda **kw: print('mode', os.environ.get('RAY_AUTH_MODE'))\n"
            "cluster.connect_ray('127.0.0.1:1')\n")
    for home, mode in ((tmp_path, "token"), (tmp_path / "empty", "None")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300, cwd=REPO,
                              env={**env, "HOME": str(home), "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"mode {mode}" in done.stdout


@pytest.mark.slow
def test_local_run_starts_its_own_ray_on_loopback(monkeypatch):
    import ray
    from ray._private import ray_constants

    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.cluster import start_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster a plain ray.init() would try to join
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "1")  # restored afterwards
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # ray.init sets it for the process: recorded so it is undone afterwards
    monkeypatch.delenv("RAY_AUTH_MODE")
    start_ray(load_config("demo", ["trainer.num_cpus=1"]))
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        listening = {c.laddr.ip for p in psutil.Process().children(recursive=True) for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    finally:
        ray.shutdown()
