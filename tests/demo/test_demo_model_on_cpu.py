"""The demo tokenizer, tiny model and batching: tokenisation round trips, labels cover only the answer,
a warm-up step lowers the loss, and a saved base checkpoint reloads with identical logits."""

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


def test_warmup_stop_criterion_needs_the_target_and_every_question_type():
    import pytest

    from mmupt_megatron.demo.rollout import EvalResult
    from mmupt_megatron.demo.warmup import stop_criterion

    cfg = WarmupConfig(target_sampled=0.75, min_kind_accuracy=0.6)
    good = EvalResult(greedy=0.9, sampled=0.8, maj=0.85, format_rate=1.0, by_kind={"all": 1.0, "shape": 0.7})
    assert stop_criterion(good, cfg)
    weak_type = EvalResult(greedy=0.9, sampled=0.8, maj=0.85, format_rate=1.0, by_kind={"all": 1.0, "shape": 0.55})
    assert not stop_criterion(weak_type, cfg)  # a type below 0.6: the vote would teach its wrong answers
    low = EvalResult(greedy=0.9, sampled=0.7, maj=0.85, format_rate=1.0, by_kind={"all": 1.0, "shape": 0.9})
    assert not stop_criterion(low, cfg)
    assert not stop_criterion(good, WarmupConfig())  # no target: never stops early
    with pytest.raises(ValueError, match="warmup: ema_decay must be in"):
        WarmupConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="warmup: consecutive must be >= 1"):
        WarmupConfig(consecutive=0)


def test_warmup_keeps_the_weights_the_average_confirmed_or_the_average(tmp_path, monkeypatch):
    """The stop is decided on the averaged weights; the base saved is the trained weights of that step
    (evaluated for the record, which ``describe_base`` reports) unless ``keep_average``."""
    from mmupt_megatron.demo import warmup as warmup_module
    from mmupt_megatron.demo.rollout import EvalResult
    from mmupt_megatron.demo.run import describe_base

    torch.set_num_threads(1)
    calls = []

    def fake_evaluate(model, *args, **kwargs):  # the stop criterion holds at once; a fixed result per call
        calls.append(model)
        return EvalResult(greedy=0.5 + 0.1 * len(calls), sampled=0.9, maj=0.9, format_rate=1.0, by_kind={"all": 1.0})

    monkeypatch.setattr(warmup_module, "evaluate", fake_evaluate)
    small = {"batch_size": 2, "max_steps": 3, "eval_every": 1, "num_eval": 2, "warmup_steps": 1, "target_sampled": 0.5,
             "min_kind_accuracy": 0.0, "consecutive": 2, "ema_decay": 0.5, "lr": 1e-2}
    model, history = warmup_module.warmup(WarmupConfig(**small), out_dir=tmp_path / "weights", log=False)
    average, _ = warmup_module.warmup(WarmupConfig(**small, keep_average=True), out_dir=tmp_path / "avg", log=False)
    # both runs trained identically; stop after step 2, keeping step 1: the weights differ from their average
    kept = history[-1]
    assert kept["kept"] and kept["step"] == 1 and kept["greedy"] == 0.5 + 0.1 * 3  # the weights' own evaluation
    assert calls[2] is model and calls[0] is not model  # evaluations 1-2 were of the average, 3 of the weights
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), average.state_dict().values()))
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "weights"), dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    assert describe_base(tmp_path / "weights").startswith("the weights of warm-up step 1 (dev greedy 0.800")
    assert describe_base(tmp_path / "avg").startswith("the averaged weights of warm-up step 1 (dev greedy 0.")
