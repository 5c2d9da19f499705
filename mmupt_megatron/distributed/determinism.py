"""``trainer.deterministic``: what each part of the stack needs to repeat a run bit for bit.

- torch: ``torch.use_deterministic_algorithms(True)``; cuBLAS then needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
  (set before CUDA starts: the cluster passes it in each actor's environment).
- Megatron: ``TransformerConfig.deterministic_mode`` (the embedding's backward without atomics); with Transformer
  Engine attention also ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``, which Megatron checks.
- NCCL: one algorithm for every collective (``NCCL_ALGO=Ring``), so a reduction sums in the same order each time.
- vLLM (GPU): ``VLLM_BATCH_INVARIANT=1``, its batch-invariant kernels: a response no longer depends on which other
  requests share its batch. On CPU vLLM's kernels are deterministic for a fixed batch, and that mode's Triton kernels
  do not exist, so it is left off.
"""

from __future__ import annotations

import os

POLICY_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "NCCL_ALGO": "Ring"}
ENGINE_GPU_ENV = {"VLLM_BATCH_INVARIANT": "1"}


def deterministic_env(*, engine: bool, on_gpu: bool) -> dict[str, str]:
    """Environment variables a policy worker (``engine=False``) or an engine process needs."""
    return {**POLICY_ENV, **(ENGINE_GPU_ENV if engine and on_gpu else {})}


def make_deterministic() -> None:
    """In a policy worker, before any CUDA work: deterministic torch algorithms (an op without a deterministic
    implementation then raises instead of running)."""
    import torch

    for key, value in POLICY_ENV.items():
        os.environ.setdefault(key, value)
    torch.use_deterministic_algorithms(True)


__all__ = ["deterministic_env", "make_deterministic"]
