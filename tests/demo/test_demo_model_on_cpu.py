"""The demo tokenizer, tiny model and batching: tokenisation round trips, labels cover only the answer,
a warm-up step lowers the loss, and a saved base checkpoint reloads with identical logits."""

import dataclasses
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from mmupt_megatron.algorithms import extract_boxed
from mmupt_megatron.data.prompts import build_prompt
from mmupt_megatron.data.synthetic import WorldConfig, generate
from mmupt_megatron.demo.model import PromptStyle, TinyModelConfig, build_model, encode_batch, mrope_section
from mmupt_megatron.demo.tokenizer import SPECIAL_TOKENS, build_tokenizer
from mmupt_megatron.demo.warmup import DEMO_STYLE, WarmupConfig, world_image_encoder, load_style, save_checkpoint


def test_tokenizer_covers_prompts_and_chains_without_unknowns():
    tokenizer = build_tokenizer()
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    for style in ("named", "tally", "describe"):
        for example in generate(20, seed=0, cfg=WorldConfig(chain_style=style)):
            text = build_prompt(example.question) + example.chain + "<|im_end|>"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            decoded = tokenizer.decode(tokenizer(example.chain, add_special_tokens=False)["input_ids"])
            assert extract_boxed(decoded) == example.answer


def test_batch_labels_cover_only_the_answer_and_pads_match_the_grid():
    tokenizer = build_tokenizer()
    examples = generate(3, seed=1, cfg=WorldConfig(chain_style="tally"))
    batch = encode_batch(tokenizer, questions=[e.question for e in examples], images=[e.image for e in examples],
                         targets=[e.chain for e in examples], encoder=world_image_encoder(WorldConfig()), style=DEMO_STYLE)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((batch["input_ids"] == image_id).sum(dim=1) == 9).all()  # 84x84 -> 3x3 merged tokens
    assert batch["pixel_values"].shape == (3 * 36, 1176)
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(labelled, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(example.chain, add_special_tokens=False)["input_ids"])
        assert labelled[-1] == tokenizer.eos_token_id
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding


def test_training_step_lowers_loss_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    assert sum(mrope_section(64)) == 32
    model = build_model(tokenizer, TinyModelConfig(), seed=0)
    examples = generate(8, seed=2)
    style = PromptStyle(system=None, image_first=False)
    batch = encode_batch(tokenizer, questions=[e.question for e in examples], images=[e.image for e in examples],
                         targets=[e.chain for e in examples], encoder=world_image_encoder(WorldConfig()), style=style)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(**batch).loss
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(**batch).loss < first
    cfg = WarmupConfig(style=style, world=WorldConfig(chain_style="named"))
    save_checkpoint(model, tokenizer, out_dir=tmp_path, cfg=cfg, history=[])
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    tokenizer2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer2("How many squares ?")["input_ids"] == tokenizer("How many squares ?")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, reloaded.eval()(**batch).logits, atol=1e-5)
    assert load_style(tmp_path) == (style, cfg.world)
    assert (tmp_path / "preprocessor_config.json").exists()


def test_question_writing_examples_match_what_synthesize_parses():
    """The warm-up's question-writing rows use the prompt ``mmupt synthesize`` builds with the demo templates,
    tokenise without unknown words, and their targets parse back to a world question (in-context: a
    different one from the seed)."""
    import random

    from mmupt_megatron.algorithms.synthesis import parse_question, synthesis_prompt
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.demo.warmup import DEMO_SYNTHESIS_TEMPLATES, DEMO_WORLD, question_writing

    cfg = load_config("demo_synthetic").synthesis
    assert DEMO_SYNTHESIS_TEMPLATES == {"in-context": cfg.in_context_template, "direct": cfg.direct_template}
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    world_questions = {e.question for e in generate(200, seed=1, cfg=DEMO_WORLD)}
    modes = set()
    for example in generate(40, seed=2, cfg=DEMO_WORLD):
        prompt, target, instruction = question_writing(rng, example, DEMO_WORLD)
        assert instruction == ""
        mode = "direct" if prompt == DEMO_SYNTHESIS_TEMPLATES["direct"] else "in-context"
        modes.add(mode)
        assert prompt == synthesis_prompt(mode, seed_question=example.question, seed_answer=example.answer,
                                          template=DEMO_SYNTHESIS_TEMPLATES[mode])
        ids = tokenizer(prompt + " " + target)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        question, reason = parse_question(tokenizer.decode(ids))  # decoded as the engine would return it
        assert reason is None and question is not None
        assert question.replace(" ?", "?") in world_questions
        if mode == "in-context":
            assert question.replace(" ?", "?") != example.question
    assert modes == {"in-context", "direct"}


def test_warmup_band_distance_needs_the_band_headroom_and_every_question_type():
    import pytest

    from mmupt_megatron.demo.rollout import EvalResult
    from mmupt_megatron.demo.warmup import band_distance

    cfg = WarmupConfig(band=(0.75, 0.9), max_greedy=0.95, min_kind_accuracy=0.6)
    good = EvalResult(greedy=0.9, sampled=0.8, maj=0.85, format_rate=1.0, by_kind={"all": 1.0, "shape": 0.7})
    assert band_distance(good, cfg) == 0.0
    weak_type = dataclasses.replace(good, by_kind={"all": 1.0, "shape": 0.55})
    assert band_distance(weak_type, cfg) == pytest.approx(0.05)  # a type below 0.6: the vote would teach its wrong answers
    assert band_distance(dataclasses.replace(good, sampled=0.7), cfg) == pytest.approx(0.05)
    assert band_distance(dataclasses.replace(good, sampled=0.97), cfg) == pytest.approx(0.07)  # no headroom
    assert band_distance(dataclasses.replace(good, greedy=0.99), cfg) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="warmup: ema_decay must be in"):
        WarmupConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="warmup: fine_every and consecutive must be >= 1"):
        WarmupConfig(fine_every=0)
    with pytest.raises(ValueError, match=r"warmup: band must be \(low, high\)"):
        WarmupConfig(band=(0.9, 0.75))


def _scripted_warmup(tmp_path, sampled: list[float], monkeypatch):
    """A warm-up (average evaluated every 2 steps; once it meets the band's low end twice in a row, the weights of
    the first of them, then the trained weights every step, at most 2 steps) whose evaluations return
    ``sampled[i]`` in call order; returns the history and the weights evaluated at each call."""
    from mmupt_megatron.demo import warmup as warmup_module
    from mmupt_megatron.demo.rollout import EvalResult

    torch.set_num_threads(1)
    seen: list[dict] = []

    def fake_evaluate(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return EvalResult(greedy=0.9, sampled=sampled[len(seen) - 1], maj=0.9, format_rate=1.0, by_kind={"all": 1.0})

    monkeypatch.setattr(warmup_module, "evaluate", fake_evaluate)
    cfg = WarmupConfig(batch_size=2, max_steps=20, eval_every=2, fine_every=1, search_steps=2, num_eval=2,
                       warmup_steps=1, lr=1e-2, band=(0.7, 0.8), min_kind_accuracy=0.0, ema_decay=0.5)
    _, history = warmup_module.warmup(cfg, out_dir=tmp_path / "base", log=False)
    assert len(seen) == len(sampled)  # nothing evaluated after the base was chosen
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    return history, seen, saved.state_dict()


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_keeps_the_weights_the_average_confirmed_when_they_are_in_the_band(tmp_path, monkeypatch):
    """The average must meet the band's low end twice in a row (an evaluation below it starts the count again);
    the trained weights of the first of the two, evaluated themselves, are the base: ``describe_base`` says so."""
    from mmupt_megatron.demo.run import describe_base

    # average @2 0.75, @4 0.60 (count reset), @6 0.75, @8 0.76; the weights of step 6: 0.78
    history, seen, saved = _scripted_warmup(tmp_path, [0.75, 0.6, 0.75, 0.76, 0.78], monkeypatch)
    kept = history[-1]
    assert kept["kept"] and kept["step"] == 6 and kept["sampled"] == 0.78
    assert [h["of"] for h in history[:-1]] == ["average"] * 4 + ["weights"]
    assert _same(saved, seen[4]) and not _same(saved, seen[3])  # the weights of step 6, not the average of step 8
    assert describe_base(tmp_path / "base").startswith("the weights of warm-up step 6 (dev greedy 0.900, sampled 0.780")


def test_warmup_searches_on_when_the_confirmed_weights_have_no_headroom(tmp_path, monkeypatch):
    """Weights past the band (0.95) when the average confirms: the trained weights are evaluated every step and
    the first inside the band is the base."""
    # average @2 0.75, @4 0.76; the weights of step 2: 0.95; of step 4: 0.97; of step 5: 0.78
    history, seen, saved = _scripted_warmup(tmp_path, [0.75, 0.76, 0.95, 0.97, 0.78], monkeypatch)
    assert history[-1]["step"] == 5 and history[-1]["how"] == "the first trained weights in the band"
    assert _same(saved, seen[4]) and not _same(saved, seen[3]) and not _same(saved, seen[2])


def test_warmup_keeps_the_nearest_weights_when_none_is_in_the_band(tmp_path, monkeypatch):
    """No trained weights in the band within ``search_steps``: the nearest evaluated (step 5, 0.85), not the last."""
    history, seen, saved = _scripted_warmup(tmp_path, [0.75, 0.76, 0.95, 0.97, 0.85, 0.99], monkeypatch)
    kept = history[-1]
    assert kept["step"] == 5 and kept["sampled"] == 0.85 and "the nearest (distance 0.050)" in kept["how"]
    assert _same(saved, seen[4]) and not _same(saved, seen[5])
