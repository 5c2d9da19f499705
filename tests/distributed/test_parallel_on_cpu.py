"""CPU compat patches, parallel groups and the worker launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers

COMPAT_PROBE = """
import torch
from mmupt_megatron.distributed.cpu_compat import apply_cpu_compat, cuda_type_names
assert apply_cpu_compat() and apply_cpu_compat()          # applied, idempotent
assert torch.cuda.current_device() == torch.device("cpu")
from megatron.core.transformer.utils import get_default_causal_mask
assert get_default_causal_mask(3).device.type == "cpu"
with cuda_type_names():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
assert torch.ones(1).type() == "torch.FloatTensor"          # scoped
print("ok")
"""


@pytest.mark.slow
def test_cpu_compat_patches_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-c", COMPAT_PROBE], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def groups_worker(tp: int, pp: int) -> tuple:
    from mmupt_megatron.distributed.parallel import init_parallel

    groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=2 // (tp * pp)))
    return groups.rank, groups.tp_rank, groups.pp_rank, groups.dp_rank, groups.pp_ranks, groups.is_last_stage


def failing_worker() -> None:
    raise ValueError("boom from a worker")


@pytest.mark.distributed
def test_groups_and_failure_reporting():
    assert run_workers(groups_worker, world_size=2, args=(1, 2)) == [
        (0, 0, 0, 0, (0, 1), False), (1, 0, 1, 0, (0, 1), True)
    ]
    with pytest.raises(RuntimeError, match="boom from a worker"):
        run_workers(failing_worker, world_size=2)
