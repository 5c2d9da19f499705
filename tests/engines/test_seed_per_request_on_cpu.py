"""rollout.seed_per_request: with it (the demo, the tests) each request carries its seed; without it (the GPU recipes)
vLLM samples from its engine generator: the setting reaches the engine's sampling parameters."""

import pytest

from mmupt_megatron.config_loading import load_config
from mmupt_megatron.engines.rollout import SamplingSpec


def test_the_gpu_recipes_sample_without_per_request_seeds_and_the_demo_with():
    assert load_config("demo").rollout.seed_per_request is True
    assert load_config("qwen2_5_vl_7b_1n8g_tp2").rollout.seed_per_request is False
    assert SamplingSpec(n=2).per_request is True


@pytest.mark.slow
def test_the_engine_seeds_each_request_only_when_asked(tmp_path, monkeypatch):
    import vllm

    from mmupt_megatron.engines.rollout import RolloutRequest
    from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine
    from tests.tiny_models import make_tiny_qwen2_5_vl

    engine = VLLMRolloutEngine(make_tiny_qwen2_5_vl(tmp_path / "m", seed=0), max_model_len=128, cpu_kvcache_gib=0.5)
    seen: list = []
    generate = engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda prompts, *, sampling_params, **kw: seen.append(
        [p.seed for p in sampling_params]) or generate(prompts, sampling_params=sampling_params, **kw))
    requests = [RolloutRequest(group_id=i, prompt=f"q{i}") for i in range(3)]
    engine.generate(requests, SamplingSpec(n=2, max_new_tokens=4, seed=7))
    engine.generate(requests, SamplingSpec(n=2, max_new_tokens=4, seed=7, per_request=False))
    assert seen == [[7, 8, 9], [None, None, None]]
    assert vllm  # the real engine sampled both
