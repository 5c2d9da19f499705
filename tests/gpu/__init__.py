"""The GPU suite (marker ``gpu``): run on one CUDA GPU with ``bash scripts/gpu_check.sh``. Without CUDA every
test here is skipped, with the reason printed (``pytest tests/gpu -rs``); CI (CPU) runs the rest.

``MMUPT_GPU_SUITE_DEVICE=cpu`` runs the same tests on the CPU instead (fp32, gloo; CUDA must be hidden:
``CUDA_VISIBLE_DEVICES=``): the dry run of ``scripts/gpu_check.sh --device cpu``, which checks the suite's own
code and the offline install on a machine without a GPU. What only a GPU has (bf16, ``torch.cuda`` memory
figures, CUDA IPC, Transformer Engine, FP8) is checked on CUDA only; on CPU the same paths run on host tensors
(shared memory instead of CUDA IPC, the policy's own storage accounting instead of the allocator's).

``record(test, **numbers)`` appends one JSON line to ``$MMUPT_GPU_PROBE_RECORD`` (when set): the figures a GPU
run measured (memory resident / offloaded / during a save, bytes refitted), which ``gpu_check.sh`` keeps
beside its summary, passed or failed."""

from __future__ import annotations

import json
import os

import pytest
import torch

DEVICE = os.environ.get("MMUPT_GPU_SUITE_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"MMUPT_GPU_SUITE_DEVICE must be 'cuda' or 'cpu', got {DEVICE!r}")
ON_CPU = DEVICE == "cpu"
DTYPE = torch.float32 if ON_CPU else torch.bfloat16
"""The policy's parameter dtype on the suite's device (the library's choice: bf16 on GPU, fp32 on CPU)."""


def _skip_reason() -> str | None:
    if not ON_CPU and not torch.cuda.is_available():
        return "needs a CUDA GPU (the GPU suite: scripts/gpu_check.sh; MMUPT_GPU_SUITE_DEVICE=cpu runs it on CPU)"
    if ON_CPU and torch.cuda.is_available():
        return "MMUPT_GPU_SUITE_DEVICE=cpu with a GPU visible: hide it (CUDA_VISIBLE_DEVICES=) for the CPU dry run"
    return None


CUDA = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
GPU = [pytest.mark.gpu, CUDA]
"""Every module here sets ``pytestmark = GPU``."""

CUDA_ONLY = pytest.mark.skipif(ON_CPU, reason="CUDA only (the CPU dry run has no such path)")


def record(test: str, **numbers) -> None:
    """Append ``{"test": test, "device": DEVICE, **numbers}`` to ``$MMUPT_GPU_PROBE_RECORD`` (if set)."""
    path = os.environ.get("MMUPT_GPU_PROBE_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "device": DEVICE, **numbers}, default=str) + "\n")
