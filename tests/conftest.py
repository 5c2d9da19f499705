"""Test-wide settings: one torch thread per process (2 cores: contention costs ~100x), quiet math-verify."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
