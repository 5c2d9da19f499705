"""Fixtures of the trainer tests."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module's tests (2 CPUs, a small object store), shut down after them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()
