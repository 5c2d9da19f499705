"""The offline GPU probe's install path, dry-run on CPU: ``scripts/gpu_wheels.sh`` downloads the wheels for this
Python (megatron-core, omegaconf, math-verify and their small dependencies, this package built as a wheel), a
fresh venv stands in for the GPU node (torch, then what the node's image has, ``node-requirements.txt``, at this
machine's versions; no megatron-core, no mmupt_megatron) and ``scripts/gpu_check.sh --device cpu`` installs the wheels with
``pip --no-index --no-deps --target`` and runs the GPU suite's stages on CPU against them. The summary must say
the install, the environment and the policy stages passed, with megatron-core and mmupt_megatron imported from
the wheels and torch from the venv, and the engine tier skipped (no vLLM / Ray there).

Also, fast: the wheel folder's checks (a torch wheel never travels; a wheel that differs from the manifest is
caught)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"


def _run(cmd: list, *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=timeout)
    print(f"{time.monotonic() - start:6.1f} s  {' '.join(map(str, cmd))[:160]}")
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _installed_versions(requirements: Path) -> list[str]:
    """name==version, as installed here, of each package named in ``requirements`` (those installed here)."""
    from importlib import metadata

    out = []
    for line in requirements.read_text().splitlines():
        name = line.split("#")[0].strip()
        if name:
            try:
                out.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
    return out


def _clean_env() -> dict:
    """This process's environment without what would leak the project's venv into the stand-in node."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MMUPT_GPU_SUITE_DEVICE", "MMUPT_GPU_PROBE_RECORD")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)
    return env


@pytest.mark.slow
def test_wheels_install_offline_and_the_policy_stages_pass_on_cpu(tmp_path):
    wheels, node, out = tmp_path / "wheels", tmp_path / "node", tmp_path / "out"
    env = _clean_env()
    _run(["bash", "scripts/gpu_wheels.sh", wheels, "--python-version", PYVER, "--python", sys.executable],
         timeout=300, env=env)
    manifest = (wheels / "manifest.txt").read_text()
    names = {line.split()[0]: line.split()[1] for line in manifest.splitlines() if line and not line.startswith("#")}
    assert names["megatron_core"] == "0.16.1" and "mmupt_megatron" in names and "omegaconf" in names
    assert not any(name.startswith(("torch", "nvidia", "triton")) for name in names)
    assert "lacks" not in manifest  # the package wheel holds every module of the checkout

    _run([sys.executable, "-m", "venv", node], timeout=120, env=env)
    py = node / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, torch_pin], timeout=600, env=env)  # the CPU build lies on this machine's disk
    # the node's packages at the versions this machine's CI runs (transformers 5.17, the node's, needs the node's
    # torchvision for the Qwen2-VL image processor; PyPI's torchvision is a CUDA build that breaks here)
    constraint = tmp_path / "versions.txt"
    constraint.write_text("\n".join([torch_pin, *_installed_versions(wheels / "node-requirements.txt")]) + "\n")
    _run([*pip, "-c", constraint, "-r", wheels / "node-requirements.txt"], timeout=600, env=env)
    absent = subprocess.run([py, "-c", "import megatron.core"], check=False, capture_output=True, env=env)
    assert absent.returncode != 0, "the stand-in node must not have megatron-core of its own"

    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--python", py, "--wheels", wheels, "--out", out,
                           "--device", "cpu", "--site", tmp_path / "site"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    rows = {line.split("\t")[0]: line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()}
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    for stage in ("install", "env", "policy", "policy-worker", "ipc-refit"):
        assert rows[stage][1] == "pass", f"{stage}: {rows[stage]}\n{logs.get(stage + '.log', '')}"
    assert rows["engine"][1] == "skip" and "vllm/ray not importable" in rows["engine"][3]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passed" in rows["policy"][3] and "passed" in rows["policy-worker"][3]
    info = json.loads((out / "env.json").read_text())
    assert info["torch"]["origin"] == "node"
    assert info["imports"]["megatron.core"]["origin"] == "wheels"
    assert info["imports"]["mmupt_megatron.engines.megatron_policy"]["origin"] == "wheels"
    records = [json.loads(line) for line in (out / "probe_record.jsonl").read_text().splitlines()]
    assert {r["test"] for r in records} >= {"offload", "policy_worker", "policy_refit"}
    assert (out / "summary.txt").read_text() in proc.stdout


def _fake_wheel(folder: Path, name: str, content: bytes = b"x") -> Path:
    path = folder / f"{name}-py3-none-any.whl"
    path.write_bytes(content)
    return path


def _probe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_probe.py"), *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_a_torch_wheel_never_travels(tmp_path):
    _fake_wheel(tmp_path, "megatron_core-0.16.1")
    _fake_wheel(tmp_path, "torch-2.13.0")
    proc = _probe("manifest", tmp_path)
    assert proc.returncode == 1 and "torch must not travel" in proc.stderr
    assert _probe("verify", tmp_path).returncode == 1


def test_a_wheel_changed_after_the_manifest_is_caught(tmp_path):
    wheel = _fake_wheel(tmp_path, "omegaconf-2.3.1")
    _fake_wheel(tmp_path, "math_verify-0.9.0")
    assert _probe("manifest", tmp_path, "--limit-mib", 1).returncode == 0
    assert _probe("verify", tmp_path).returncode == 0
    wheel.write_bytes(b"y")  # same size, different bytes: a broken transfer
    proc = _probe("verify", tmp_path)
    assert proc.returncode == 1 and "differs from manifest.txt" in proc.stderr


def test_two_versions_and_the_size_limit_are_refused(tmp_path):
    _fake_wheel(tmp_path, "omegaconf-2.3.1")
    _fake_wheel(tmp_path, "omegaconf-2.3.0")
    proc = _probe("manifest", tmp_path)
    assert proc.returncode == 1 and "two versions of omegaconf" in proc.stderr
    big = tmp_path / "big"
    big.mkdir()
    _fake_wheel(big, "megatron_core-0.16.1", b"\0" * (2 << 20))
    proc = _probe("manifest", big, "--limit-mib", 1)
    assert proc.returncode == 1 and "over the 1.0 MiB" in proc.stderr


def test_summary_reads_each_stage_and_calls_an_all_skipped_suite_a_skip(tmp_path):
    (tmp_path / "logs").mkdir()
    logs = {"env": "python 3.12\nRESULT: torch 2.11.0+cu130, NVIDIA H100 80GB HBM3 79.1/79.2 GiB free\n",
            "policy": "..F\nFAILED tests/gpu/test_policy_on_gpu.py::test_offload_frees - AssertionError\n"
                      "1 failed, 2 passed, 1 skipped in 80.12s\n",
            "ipc-refit": "ss\nSKIPPED [2] tests/gpu/x.py:1: needs a CUDA GPU\n2 skipped in 1.01s\n"}
    for name, text in logs.items():
        (tmp_path / "logs" / f"{name}.log").write_text(text)
    stamp = time.time()
    (tmp_path / "stages.tsv").write_text("".join(
        f"{name}\t{status}\t{secs}\t{stamp}\t{stamp + secs}\t{rc}\t{note}\n" for name, status, secs, rc, note in [
            ("env", "pass", 3.0, 0, ""), ("policy", "FAIL", 80.0, 1, ""), ("ipc-refit", "pass", 2.0, 0, ""),
            ("engine", "skip", 0, "", "skipped: vllm/ray not importable")]))
    trace = [(stamp + 1, 1200), (stamp + 40, 30500), (stamp + 79, 2000), (stamp + 200, 9000)]  # nvidia-smi -lms 500
    (tmp_path / "memory_trace.csv").write_text("".join(
        f"{time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(t))}.250, 0, {used}, 81559, 37\n" for t, used in trace))
    proc = _probe("summary", tmp_path)
    assert proc.returncode == 1  # a stage failed
    rows = {line.split("\t")[0]: line.split("\t") for line in (tmp_path / "summary.tsv").read_text().splitlines()}
    assert rows["env"][1] == "pass" and "H100" in rows["env"][3]
    assert rows["policy"][1] == "FAIL" and "1 failed, 2 passed" in rows["policy"][3] and "test_offload_frees" in rows["policy"][3]
    assert rows["ipc-refit"][1] == "skip"  # pytest exits 0 when everything skipped: nothing was checked
    assert rows["engine"][1] == "skip" and rows["engine"][3] == "skipped: vllm/ray not importable"
    assert "[peak 30500 MiB]" in rows["policy"][3] and "[peak 1200 MiB]" in rows["env"][3]
    summary = (tmp_path / "summary.txt").read_text()
    assert "failed: policy" in summary and "peak 30500 of 81559 MiB, 4 samples" in summary
