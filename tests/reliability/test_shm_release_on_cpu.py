"""No shared memory outlives a cluster: the refit's /dev/shm segments are released at shutdown, also when the
worker that owned them died (it cannot release them: they are swept by name). The Ray error of the dead worker
reads as one line naming the cause."""

import os

import pytest

from mmupt_megatron.cli_errors import describe_failure
from mmupt_megatron.config_loading import load_config
from tests.tiny_models import make_tiny_qwen2_5_vl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def segments(prefix):
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def test_segments_are_released_after_a_worker_dies(tmp_path):
    import ray

    from mmupt_megatron.trainer.cluster import Cluster

    model = make_tiny_qwen2_5_vl(tmp_path / "model", seed=0)
    cfg = load_config("demo", [f"model.path={model}", f"trainer.output_dir={tmp_path / 'run'}", "trainer.num_cpus=2",
                               "rollout.refit_transport=shm", "rollout.max_new_tokens=8", "algorithm.loss.kl_coef=0"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        cluster = Cluster(cfg, model_dir=str(model))
        cluster.refit()
        assert len(segments(cluster.shm_prefix)) == 1  # the sender's reused bucket segment
        ray.kill(cluster.workers[0])  # the sender dies holding it (as on a crash: no finalizer runs)
        with pytest.raises(ray.exceptions.RayError) as info:
            cluster.refit()
        message, code = describe_failure(info.value)
        assert code == 1 and message.startswith("in Ray") and "\n" not in message and "died" in message.lower()
        cluster.shutdown()
        assert segments(cluster.shm_prefix) == []
    finally:
        ray.shutdown()
