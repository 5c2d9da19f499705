"""Pieces of the research GRPO harness: response masks line up with the response tokens, the
deduplicated vision pass gives the same log-probs, and one label-free step runs end to end."""

import torch

from mmupt_megatron.data.synthetic import WorldConfig, generate
from mmupt_megatron.demo.model import TinyModelConfig, build_model, encode_batch
from research.quick_grpo import GRPOConfig, grpo_run, response_batch, sequence_logprobs
from mmupt_megatron.demo.tokenizer import build_tokenizer
from mmupt_megatron.demo.warmup import DEMO_STYLE, world_image_encoder


def _setup(group_size: int = 3):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyModelConfig(), seed=0).eval()
    examples = [e for e in generate(2, seed=0) for _ in range(group_size)]
    prompts = encode_batch(tokenizer, questions=[e.question for e in examples], images=[e.image for e in examples],
                           encoder=world_image_encoder(WorldConfig()), style=DEMO_STYLE)
    return tokenizer, model, prompts


def test_response_mask_marks_exactly_the_response_targets():
    tokenizer, _, prompts = _setup()
    responses = [[5, 6, tokenizer.eos_token_id], [7], [8, 9], [5], [6, 6, 6, 6], [tokenizer.eos_token_id]]
    batch, mask = response_batch(prompts, responses, tokenizer.pad_token_id)
    assert mask.shape == (6, batch["input_ids"].shape[1] - 1)
    assert mask.sum(dim=1).tolist() == [len(r) for r in responses]
    targets = batch["input_ids"][:, 1:]
    for row, response in enumerate(responses):
        assert targets[row][mask[row].bool()].tolist() == response


def test_vision_dedup_gives_identical_logprobs():
    tokenizer, model, prompts = _setup(group_size=3)
    responses = [[5, 6], [7], [8, 9, 10], [5], [6, 6], [tokenizer.eos_token_id]]
    batch, _ = response_batch(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        full = sequence_logprobs(model, batch)
        dedup = sequence_logprobs(model, batch, group_size=3)
    assert torch.allclose(full, dedup, atol=1e-6)


def test_one_label_free_step_runs_and_reports(capsys):
    tokenizer, model, _ = _setup()
    cfg = GRPOConfig(steps=1, batch_size=2, group_size=2, num_eval=2, eval_samples=2, max_new_tokens=6)
    result = grpo_run(model, tokenizer, world=WorldConfig(), style=DEMO_STYLE, cfg=cfg, seed=0, log=False)
    assert [e["step"] for e in result["evals"]] == [0, 1]
    assert len(result["steps"]) == 1 and 0.0 <= result["steps"][0]["reward"] <= 1.0


def test_grpo_seeds_names_the_missing_demo_file_before_training(tmp_path):
    """research.grpo_seeds refuses a demo folder without a base, naming the file, before anything starts."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "research.grpo_seeds", "--demo", str(tmp_path / "demo_s1"), "--seeds", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"grpo_seeds: {tmp_path / 'demo_s1' / 'base' / 'config.json'} does not exist" in result.stderr
