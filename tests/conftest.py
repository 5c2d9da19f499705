"""Test-wide settings: one torch thread per process (2 cores: contention costs ~100x), quiet math-verify."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests that spawn worker processes (``distributed``) take well over 10 s on 2 cores: they are ``slow`` too,
    so ``-m "not slow"`` is a fast suite."""
    import pytest

    for item in items:
        if item.get_closest_marker("distributed") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
