"""The vLLM rollout engine on a tiny random Qwen2.5-VL with a real PNG: generation, log-probs, refit."""

import pytest
import torch
from safetensors.torch import load_file

from mmupt_megatron.engines.rollout import RolloutRequest, SamplingSpec
from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine, fused_siblings
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.models.tiny_inputs import hf_logits, png_image

pytestmark = pytest.mark.slow  # a real vLLM engine: ~10 s to start on 2 cores

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = make_tiny_qwen2_5_vl(root / "tiny", seed=3)
    image = png_image(root / "img.png", height=56, width=84, seed=1)
    engine = VLLMRolloutEngine(model_dir, max_model_len=256, cpu_kvcache_gib=0.5, seed=0)
    requests = [
        RolloutRequest(group_id=("q", 17), prompt=PROMPT.format(q="How many?"), images=[image]),
        RolloutRequest(group_id=("q", 4), prompt=PROMPT.format(q="What colour?"), images=[image]),
        RolloutRequest(group_id="text-only", prompt=PROMPT.replace("<|vision_start|><|image_pad|><|vision_end|>", "").format(q="hi")),
    ]
    yield engine, requests, model_dir
    engine.close()


def test_n_samples_per_prompt_with_logprobs_and_group_ids(setup):
    engine, requests, _ = setup
    rollouts = engine.generate(requests, SamplingSpec(n=4, max_new_tokens=6, seed=11))
    assert len(rollouts) == 12
    assert [r.group_id for r in rollouts] == [req.group_id for req in requests for _ in range(4)]
    assert [r.sample_index for r in rollouts[:4]] == [0, 1, 2, 3]
    for r in rollouts:
        assert 1 <= len(r.response_token_ids) <= 6 and len(r.response_logprobs) == len(r.response_token_ids)
        assert all(lp <= 0 for lp in r.response_logprobs)
        assert r.finish_reason in ("stop", "length")
    # the image prompt was expanded into image-pad tokens, the text prompt was not
    assert len(rollouts[0].prompt_token_ids) > len(rollouts[8].prompt_token_ids)
    # four samples of one prompt are not all the same
    assert len({tuple(r.response_token_ids) for r in rollouts[:4]}) > 1


def test_seeded_runs_reproduce_and_seeds_matter(setup):
    engine, requests, _ = setup
    spec = SamplingSpec(n=3, max_new_tokens=6, seed=5)
    a = engine.generate(requests, spec)
    b = engine.generate(requests, spec)
    c = engine.generate(requests, SamplingSpec(n=3, max_new_tokens=6, seed=6))
    assert [r.response_token_ids for r in a] == [r.response_token_ids for r in b]
    assert [r.response_logprobs for r in a] == [r.response_logprobs for r in b]
    assert [r.response_token_ids for r in a] != [r.response_token_ids for r in c]
    # batching does not change a request's samples (request i is seeded with seed + i)
    alone = engine.generate(requests[:1], spec)
    assert [r.response_token_ids for r in alone] == [r.response_token_ids for r in a[:3]]


def test_logprobs_match_transformers(setup):
    engine, requests, model_dir = setup
    (rollout,) = engine.generate(requests[:1], SamplingSpec(n=1, max_new_tokens=6, seed=2))
    from transformers import AutoImageProcessor

    features = AutoImageProcessor.from_pretrained(model_dir)(images=list(requests[0].images), return_tensors="pt")
    ids = torch.tensor([rollout.prompt_token_ids + rollout.response_token_ids])
    logits = hf_logits(model_dir, ids, features["pixel_values"], features["image_grid_thw"])
    start = len(rollout.prompt_token_ids)
    expected = logits[0, start - 1 : -1].log_softmax(-1).gather(-1, ids[0, start:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(rollout.response_logprobs), expected, atol=1e-4)
    (scored,) = engine.prompt_logprobs(requests[:1], [rollout.response_token_ids])
    assert torch.allclose(scored, expected, atol=1e-4)


def test_refit_changes_logprobs_and_restoring_restores_them(setup):
    engine, requests, model_dir = setup
    rollouts = engine.generate(requests, SamplingSpec(n=1, max_new_tokens=5, seed=3))
    completions = [r.response_token_ids for r in rollouts]
    before = engine.prompt_logprobs(requests, completions)
    weights = load_file(str(model_dir / "model.safetensors"))
    layer = {k: v for k, v in weights.items() if ".layers.0." in k and not k.startswith("visual")}
    vision = {k: v for k, v in weights.items() if k.startswith(("visual.blocks.0.", "model.visual.blocks.0."))}
    assert layer and vision
    changed = {k: v * 1.5 for k, v in {**layer, **vision}.items()}
    assert engine.load_weights(changed.items()) == len(changed)
    after = engine.prompt_logprobs(requests, completions)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(after, before))
    # the vision tower is updated too: the text-only prompt moved only through the language layer,
    # so refit the language layer back and the image prompts must still differ
    engine.load_weights(layer.items())
    partial = engine.prompt_logprobs(requests, completions)
    assert torch.equal(partial[2], before[2]) and (partial[0] - before[0]).abs().max() > 1e-4
    engine.load_weights(weights.items())
    restored = engine.prompt_logprobs(requests, completions)
    assert all(torch.equal(a, b) for a, b in zip(restored, before))


def test_bad_refit_names_the_parameter_and_leaves_the_engine_alive(setup):
    engine, requests, model_dir = setup
    weights = load_file(str(model_dir / "model.safetensors"))
    qkv = {k: v for k, v in weights.items() if ".layers.1.self_attn." in k and "_proj" in k and "o_proj" not in k}
    with pytest.raises(ValueError, match="'not.a.param' is not a parameter"):
        engine.load_weights([("not.a.param", torch.zeros(1))])
    name = next(k for k in qkv if "q_proj.weight" in k)
    with pytest.raises(ValueError, match=f"{name!r} has shape \\(3, 128\\)"):
        engine.load_weights([*((k, v) for k, v in qkv.items() if k != name), (name, qkv[name][:3])])
    with pytest.raises(ValueError, match="sent without"):
        engine.load_weights([(name, qkv[name])])
    assert len(engine.generate(requests[:1], SamplingSpec(n=2, max_new_tokens=3))) == 2


def test_fused_siblings():
    assert fused_siblings("model.layers.3.self_attn.k_proj.bias") == [
        "model.layers.3.self_attn.q_proj.bias", "model.layers.3.self_attn.v_proj.bias"
    ]
    assert fused_siblings("model.layers.0.mlp.down_proj.weight") == []


def test_large_seeded_batches_do_not_chunk_prefill(setup):
    """192 seeded sequences x ~30 prompt tokens exceed vLLM's default token budget per step; a chunked
    prefill of a seeded request crashed the CPU sampler ("CPU Generator does not use offset")."""
    engine, requests, _ = setup
    rollouts = engine.generate(requests[:2] * 6, SamplingSpec(n=16, max_new_tokens=2, seed=1))
    assert len(rollouts) == 192 and all(r.response_token_ids for r in rollouts)


def refit_in_workers(root: str) -> dict:
    """In a fresh process (vLLM caches its environment once an engine started): the engine core in a process of
    its own; weights reach its workers as a frame's bytes, a shared-memory segment's name, a tensor handle."""
    from multiprocessing.shared_memory import SharedMemory
    from pathlib import Path

    import torch.multiprocessing
    from safetensors.torch import save

    from mmupt_megatron.engines.vllm_worker import share_tensor

    tmp = Path(root)
    model_dir = make_tiny_qwen2_5_vl(tmp / "tiny", seed=3)
    image = png_image(tmp / "img.png", height=56, width=84, seed=1)
    requests = [RolloutRequest(group_id=0, prompt=PROMPT.format(q="How many?"), images=[image])]
    engine = VLLMRolloutEngine(model_dir, max_model_len=256, cpu_kvcache_gib=0.5, seed=0, multiprocess=True)
    out = {"client": type(engine.llm.llm_engine.engine_core).__name__}
    try:
        completions = [r.response_token_ids for r in engine.generate(requests, SamplingSpec(n=1, max_new_tokens=5, seed=3))]
        before = engine.prompt_logprobs(requests, completions)[0]
        weights = load_file(str(model_dir / "model.safetensors"))
        layer = {k: v for k, v in weights.items() if ".layers.0." in k and not k.startswith("visual")}
        changed, original = save({k: v * 1.5 for k, v in layer.items()}), save(layer)
        out["layer"] = len(layer)

        out["frame"] = engine.load_bucket("mmupt_load_frame", changed)
        after = engine.prompt_logprobs(requests, completions)[0]
        out["frame_moved"] = float((after - before).abs().max())

        segment = SharedMemory(create=True, size=len(original))
        try:
            segment.buf[: len(original)] = original
            out["shm"] = engine.load_bucket("mmupt_load_shm", segment.name, len(original))
        finally:
            segment.close()
            segment.unlink()
        out["shm_restored"] = torch.equal(engine.prompt_logprobs(requests, completions)[0], before)

        torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors shared by file name
        shared = torch.zeros(len(changed), dtype=torch.uint8).share_memory_()
        handle = share_tensor(shared)  # before the bytes are written: a handle, not a copy
        shared.copy_(torch.frombuffer(bytearray(changed), dtype=torch.uint8))
        out["shared"] = engine.load_bucket("mmupt_load_shared", handle, len(changed))
        out["shared_equals_frame"] = torch.equal(engine.prompt_logprobs(requests, completions)[0], after)
    finally:
        engine.close()
    return out


@pytest.mark.slow
def test_refit_inside_the_workers_with_the_engine_core_in_its_own_process(tmp_path):
    """What the GPU path needs: the engine core in another process, weights reaching vLLM's workers as plain
    data, never as a Python iterator."""
    from mmupt_megatron.distributed.parallel import run_workers

    [out] = run_workers(refit_in_workers, world_size=1, args=(str(tmp_path),))
    assert out["client"] == "SyncMPClient"  # the engine core really runs in a process of its own
    assert out["frame"] == out["shm"] == out["shared"] == out["layer"]
    assert out["frame_moved"] > 1e-3 and out["shm_restored"] and out["shared_equals_frame"]
