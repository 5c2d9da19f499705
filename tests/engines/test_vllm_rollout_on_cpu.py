"""The vLLM rollout engine on a tiny random Qwen2.5-VL with a real PNG: generation, log-probs, refit."""

import math

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
    # sampled tokens: the distribution they were drawn from, without the banned vision tokens
    banned = logits[0, start - 1 : -1].clone()
    banned[:, list(engine.vision_token_ids)] = float("-inf")
    sampled = banned.log_softmax(-1).gather(-1, ids[0, start:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(rollout.response_logprobs), sampled, atol=1e-4)
    # given tokens are scored before vLLM's sampler: the model's own distribution at temperature 1
    (scored,) = engine.prompt_logprobs(requests[:1], [rollout.response_token_ids])
    assert torch.allclose(scored, expected, atol=1e-4)


def policy_logprobs_worker(model_dir: str, batch, temperatures: tuple[float, ...]) -> dict:
    """A world-1 Megatron policy sampling at ``temperatures[0]``: its log-probs of ``batch`` at each temperature."""
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import load_hf_weights

    groups = init_parallel(ParallelDims())
    model = Qwen2_5_VLModel(load_arch(model_dir), groups, init_weights=False)
    load_hf_weights(model, model_dir)
    policy = MegatronPolicy(model, groups, PolicyOptimConfig(temperature=temperatures[0], micro_batch_size=4))
    out = {temperatures[0]: policy.compute_logprobs(batch)}  # the config's temperature
    out.update({t: policy.compute_logprobs(batch, temperature=t) for t in temperatures[1:]})
    return out


@torch.no_grad()
def transformers_logprobs(model_dir, rollouts, images, *, temperature: float, banned=()) -> torch.Tensor:
    """[B, T-1] log-probs of each rollout's response tokens (laid out as ``pack_rollouts`` does) under
    transformers' softmax(logits / temperature), with ``banned`` token ids removed from the distribution."""
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    width = max(len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts)
    out = torch.zeros(len(rollouts), width - 1)
    for b, r in enumerate(rollouts):
        ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
        pixels, grid = images.get(r.prompt_index, (None, None))
        logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                       mm_token_type_ids=(ids == model.config.image_token_id).int()).logits[0, :-1] / temperature
        logits[:, list(banned)] = float("-inf")
        start = len(r.prompt_token_ids) - 1
        out[b, start : ids.shape[1] - 1] = logits.log_softmax(-1)[start:].gather(-1, ids[0, start + 1 :, None]).squeeze(-1)
    return out


def test_sampled_logprobs_are_the_policys_at_the_sampling_temperature(setup):
    """The engine reports each sampled token's log-prob under the distribution it drew from (vLLM's processed
    log-probs: the logits / T of its banned-token-free vocabulary, then top-p); the Megatron policy's are
    transformers' softmax(logits / T). At T=0.7 the two are close (they differ only by the banned tokens' mass,
    ~1% in a random tiny model, ~0 in a trained one), far from the policy's untempered ones; with top-p the
    engine's renormalised nucleus is higher by at most log(1 / top_p)."""
    from transformers import AutoImageProcessor

    from mmupt_megatron.algorithms.loss import logprob_gap
    from mmupt_megatron.distributed.parallel import run_workers
    from mmupt_megatron.trainer.batching import engine_logprobs, pack_rollouts

    engine, requests, model_dir = setup
    features = AutoImageProcessor.from_pretrained(model_dir)(images=list(requests[0].images), return_tensors="pt")
    images = {i: (features["pixel_values"], features["image_grid_thw"]) for i, r in enumerate(requests) if r.images}
    full = engine.generate(requests, SamplingSpec(n=3, temperature=0.7, top_p=1.0, max_new_tokens=8, seed=4))
    nucleus = engine.generate(requests, SamplingSpec(n=3, temperature=0.7, top_p=0.8, max_new_tokens=8, seed=4))
    rollouts, half = full + nucleus, len(full)
    batch = pack_rollouts(rollouts, pad_id=engine.tokenizer.pad_token_id or 0, images=images)
    [policy] = run_workers(policy_logprobs_worker, world_size=1, args=(str(model_dir), batch, (0.7, 1.0)))
    engine_BT, mask_BT = engine_logprobs(rollouts, batch.loss_mask_BT), batch.loss_mask_BT
    hf_BT = transformers_logprobs(model_dir, rollouts, images, temperature=0.7)
    sampled_BT = transformers_logprobs(model_dir, rollouts, images, temperature=0.7, banned=engine.vision_token_ids)

    def max_diff(a_BT, b_BT, rows=slice(None)) -> float:
        return float(((a_BT[rows] - b_BT[rows]).abs() * mask_BT[rows]).max())

    # the Megatron policy at T=0.7 is transformers' logits / 0.7; the engine's is the distribution it sampled from
    assert max_diff(policy[0.7], hf_BT) < 1e-4
    assert max_diff(engine_BT, sampled_BT, slice(0, half)) < 1e-4

    def gap(temperature: float) -> dict[str, float]:
        rows = slice(0, half)
        return {k: round(float(v), 5) for k, v in logprob_gap(policy[temperature][rows], engine_BT[rows], mask_BT[rows]).items()}

    matched, mismatched = gap(0.7), gap(1.0)
    print(f"\nsampled at T=0.7, top_p=1: |engine - policy| at T=0.7 {matched}, at T=1 {mismatched}")
    assert matched["logprob_gap_max"] < 0.02 and mismatched["logprob_gap_mean"] > 5 * matched["logprob_gap_mean"]
    # top-p 0.8: engine - (banned-free) distribution = -log(nucleus mass) on every sampled token, in [0, log(1/0.8)]
    excess = (engine_BT[half:] - sampled_BT[half:])[mask_BT[half:].bool()]
    print(f"top_p=0.8: engine - policy log-prob in [{float(excess.min()):.4f}, {float(excess.max()):.4f}], "
          f"mean {float(excess.mean()):.4f} (bound log(1/0.8) = {math.log(1 / 0.8):.4f})")
    assert float(excess.min()) > -1e-4 and float(excess.max()) < math.log(1 / 0.8) + 1e-4 and float(excess.mean()) > 1e-3


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
