"""Data-parallel rollout through Ray: two vLLM engines sample exactly what one engine samples for the same
batch, both take every refit by tensor handle or by broadcast (checked against the policy after the step) from
several senders at once (a DP=2 policy: each replica refits its own engine; a PP=2 policy: each stage sends its
layers to both engines over a refit group of its own), and an impossible placement fails with an error naming what
was asked."""

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.configured import prompt_for
from mmupt_megatron.data.synthetic import write_splits
from mmupt_megatron.engines.rollout import RolloutRequest, SamplingSpec
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.trainer.boxed_model import teach_boxed_answers

pytestmark = pytest.mark.distributed


@pytest.mark.slow
@pytest.mark.parametrize(("transport", "layout"), [("ipc", "parallel.data_parallel_size=2"),
                                                   ("broadcast", "parallel.pipeline_parallel_size=2")])
def test_two_engines_sample_what_one_would_and_both_take_the_refit(tmp_path, ray_local, transport, layout):
    import ray

    from mmupt_megatron.trainer.loop import Trainer

    model = teach_boxed_answers(make_tiny_qwen2_5_vl(tmp_path / "model", seed=0))
    data = write_splits(tmp_path / "data", num_train=8, num_test=2, seed=0)
    cfg = load_config("demo", [
        f"model.path={model}", f"data.train_files=[{data['train']}]", f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.colocate=false", "rollout.num_engines=2", "trainer.steps=1", "trainer.prompts_per_step=3",
        "trainer.prompts_per_update=3", "rollout.n=4", "rollout.max_new_tokens=8", "trainer.num_cpus=2",
        "rollout.verify_refit=true", "rollout.verify_refit_tol=1e-4", "checkpoint.export_hf=false",
        "logging.plots=false", "logging.tensorboard=false",
        # ipc: buckets shared by tensor handle (GPU: CUDA IPC; here a shared-memory file, the same calls);
        # broadcast: over a refit process group (GPU: NCCL; here gloo, the same calls)
        f"rollout.refit_transport={transport}", layout,
        "rollout.refit_timeout_s=60",  # a refit group that cannot form fails in a minute, naming itself
    ])
    trainer = Trainer(cfg)
    cluster = trainer.cluster
    try:
        assert cluster.num_engines == len(cluster.engines) == 2
        assert len(ray.util.placement_group_table(cluster.placement)["bundles"]) == 4  # 2 policy ranks + 2 engines
        # DP=2: replica d refits engine d (balanced: all on one node, no GPUs); PP=2: the one replica refits both
        assert cluster.refit_sources == ([0, 1] if cluster.dims.dp == 2 else [0, 0])
        requests = [RolloutRequest(group_id=i, prompt=prompt_for(sample.question, cfg.data),
                                   images=[trainer.images.fit(image)])
                    for i, (sample, image) in enumerate(trainer.dataset[j] for j in range(5))]
        spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=8, seed=11)
        two = cluster.generate(requests, spec)
        one = ray.get(cluster.engines[1].generate.remote(requests, spec))
        assert [(r.group_id, r.prompt_index, r.sample_index, r.response_token_ids) for r in two] == \
               [(r.group_id, r.prompt_index, r.sample_index, r.response_token_ids) for r in one]
        assert max(abs(a - b) for x, y in zip(two, one) for a, b in zip(x.response_logprobs, y.response_logprobs)) < 1e-5
        # one training step: the refit reaches both engines, and verify_refit checks each (it raises otherwise)
        [metrics] = trainer.fit()
        assert metrics["train/refit_max_diff"] < 1e-4 and metrics["train/grad_norm"] > 0
        # one mini-batch, one epoch: on policy, the engine gap came from the training forward through Ray
        assert metrics["rollout/logprob_gap_max"] < 1e-3 and metrics["train/ratio_mean"] == 1.0
        # every sender used the transport asked for: both replicas (DP=2) or both stages (PP=2)
        assert ray.get([w.refit_transport.remote() for w in cluster.workers]) == [transport, transport]
        # two stages broadcasting to the same two engines take turns (else each could hold one engine and wait
        # for the other); DP=2's replicas refit engines of their own, at once
        assert cluster.refit_waves == ([[0], [1]] if transport == "broadcast" else [[0, 1]])
    finally:
        cluster.shutdown()


def test_a_placement_that_cannot_be_met_names_what_was_asked(ray_local):
    from mmupt_megatron.trainer.cluster import place

    with pytest.raises(RuntimeError, match=r"could not place 2 bundles of \{'GPU': 1\}.*0 GPUs / 2 CPUs"):
        place([{"GPU": 1}] * 2, timeout_s=1)
