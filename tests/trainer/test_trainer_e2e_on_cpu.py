"""Two MM-UPT steps end to end on CPU: Ray, 2 Megatron workers at TP=2 (gloo) with sequence parallelism and
micro-batches by token budget, a vLLM engine, real parquet."""

import json

import pytest
import torch

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.synthetic import write_splits
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_boxed_answers

pytestmark = pytest.mark.distributed


def test_two_steps_tp2_through_ray(tmp_path, ray_local):
    from mmupt_megatron.trainer.loop import Trainer

    model = teach_boxed_answers(make_tiny_qwen2_5_vl(tmp_path / "model", seed=0))
    data = write_splits(tmp_path / "data", num_train=8, num_test=2, seed=0)
    cfg = load_config("demo", [
        f"model.path={model}", f"data.train_files=[{data['train']}]", f"trainer.output_dir={tmp_path / 'run'}",
        "parallel.tensor_parallel_size=2", "trainer.steps=2", "trainer.prompts_per_step=2",
        "trainer.prompts_per_update=1", "trainer.micro_batch_size=4", "rollout.n=4", "rollout.n_vote=6",
        "rollout.max_new_tokens=8", "trainer.lr=1e-4", "algorithm.loss.kl_coef=0.1", "trainer.num_cpus=2",
        "rollout.verify_refit=true", f"data.eval_files=[{data['test']}]", "trainer.eval_k=4", "rollout.verify_refit_tol=1e-4",
        "rollout.temperature=0.7", "parallel.sequence_parallel=true", "trainer.max_tokens_per_micro_batch=256",
        "trainer.sequence_packing=true",
    ])
    trainer = Trainer(cfg)
    history = trainer.fit()
    assert [m["step"] for m in history] == [0, 1]
    for m in history:
        # equal-size groups, hard majority reward, no agreement floor: the mean reward is the mean majority share
        assert m["reward"] == pytest.approx(m["majority_share"]) and m["reward"] > 0
        assert m["no_answer"] < 0.5 and m["train/num_tokens"] > 0 and m["train/grad_norm"] > 0
        # the engine serves exactly the trained weights after each bucketed refit
        assert m["train/refit_max_diff"] < 1e-4
        # the policy scores the engine's samples as the engine did (fp32): same model, same inputs, same temperature
        # (measured: mean ~7e-6, max ~5e-5; the engine's distribution lacks the banned vision tokens, whose mass
        # this model puts at ~2e-4 at T=1 and far less at 0.7)
        assert m["rollout/logprob_gap_mean"] < 1e-4 and m["rollout/logprob_gap_max"] < 1e-3
        assert "train/kl_ref" in m and all(m[f"time/{k}"] > 0 for k in ("rollout", "train", "refit"))
        # what went to the 2 workers (each prompt's image once) and the padding their forwards computed
        assert m["batch/bytes_to_policy"] > 0 and 0 <= m["batch/padding_waste_pct"] < 10  # packed: a multiple of TP
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [0, 1]
    # held-out evaluation at the first and last step, as returned and as logged; plots, TensorBoard, an HF export
    for m, line in zip(history, logged, strict=True):
        assert {"eval/pass@1", "eval/maj@k", "eval/pass@k"} <= set(m)
        assert all(line[key] == pytest.approx(value) for key, value in m.items())
    assert (tmp_path / "run" / "plots" / "reward.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf").state_dict()
    base = AutoModelForImageTextToText.from_pretrained(model).state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(exported[k], base[k]) for k in base)  # the trained weights, not the base's
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
