"""Two MM-UPT steps end to end on CPU: Ray, 2 Megatron workers at TP=2 (gloo), a vLLM engine, real parquet."""

import json

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.synthetic import synthesize
from mmupt_megatron.models.tiny import make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_boxed_answers

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_steps_tp2_through_ray(tmp_path, ray_local):
    from mmupt_megatron.trainer.loop import Trainer

    model = teach_boxed_answers(make_tiny_qwen2_5_vl(tmp_path / "model", seed=0))
    data = synthesize(tmp_path / "data", num_train=8, num_test=2, seed=0)
    cfg = load_config("demo", [
        f"model.path={model}", f"data.train_files=[{data['train']}]", f"trainer.output_dir={tmp_path / 'run'}",
        "parallel.tensor_parallel_size=2", "trainer.steps=2", "trainer.prompts_per_step=2",
        "trainer.prompts_per_update=1", "trainer.micro_batch_size=4", "rollout.n=4", "rollout.n_vote=6",
        "rollout.max_new_tokens=8", "trainer.lr=1e-4", "algorithm.kl_coef=0.1", "trainer.num_cpus=2",
        "rollout.verify_refit=true", f"data.eval_files=[{data['test']}]", "trainer.eval_k=4", "rollout.verify_refit_tol=1e-4",
    ])
    trainer = Trainer(cfg)
    history = trainer.fit()
    assert [m["step"] for m in history] == [0, 1]
    for m in history:
        assert 0.0 <= m["reward"] <= 1.0 and 0.0 < m["majority_share"] <= 1.0
        assert m["no_answer"] < 0.5 and m["train/num_tokens"] > 0 and m["train/grad_norm"] > 0
        # the engine serves exactly the trained weights after each bucketed refit
        assert m["train/refit_max_diff"] < 1e-4
        # the policy scores the engine's samples as the engine did (fp32): same model, same inputs
        assert m["rollout/logprob_gap_mean"] < 1e-4 and m["rollout/logprob_gap_max"] < 1e-3
        assert "train/kl_ref" in m and all(m[f"time/{k}"] > 0 for k in ("rollout", "train", "refit"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    # held-out evaluation at the first and last step, plots, TensorBoard, an HF export transformers loads
    assert all(0.0 <= m["eval/maj@k"] <= 1.0 and m["eval/pass@k"] >= m["eval/pass@1"] for m in history)
    assert (tmp_path / "run" / "plots" / "reward.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf")
    assert sum(p.numel() for p in exported.parameters()) > 0
    # colocated (the default): one bundle per policy rank, the engine shares rank 0's
    import ray

    assert trainer.cluster.colocated
    assert len(ray.util.placement_group_table(trainer.cluster.placement)["bundles"]) == 2
    # same host: buckets went through shared memory (the TP ranks wrote their pieces into it)
    assert ray.get([w.refit_transport.remote() for w in trainer.cluster.workers]) == ["shm", None]
    import os

    def segments():
        return [name for name in os.listdir("/dev/shm") if name.startswith(trainer.cluster.shm_prefix)]

    assert len(segments()) == 1  # the sender's reused segment, alive between refits
    trainer.cluster.shutdown()
    assert segments() == []  # released at shutdown: nothing left in /dev/shm
