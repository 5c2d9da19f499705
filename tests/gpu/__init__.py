"""The GPU suite (marker ``gpu``): run on one CUDA GPU with ``bash scripts/gpu_check.sh``. Without CUDA every
test here is skipped, with the reason printed (``pytest tests/gpu -rs``); CI (CPU) runs the rest."""

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU suite: scripts/gpu_check.sh)")
GPU = [pytest.mark.gpu, CUDA]
"""Every module here sets ``pytestmark = GPU``."""
