"""Test fixtures: tiny random Qwen2.5-VL / Qwen2 checkpoints and tokenizers, built offline.

``make_tiny_qwen2_5_vl`` writes a folder that transformers loads with ``from_pretrained``: config,
safetensors, a byte-level BPE tokenizer trained with the ``tokenizers`` library on a small corpus (with the
Qwen2.5-VL special tokens and a Qwen-style chat template) and ``preprocessor_config.json`` from
``Qwen2VLImageProcessor`` (the combined processor cannot be saved without torchvision).
``make_tokenizer`` is reusable on its own (``benchmarks/convert.py`` uses it for a full-size vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from mmupt_megatron.models.tokens import CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

DEFAULT_CORPUS = (
    "What is the answer? The answer is \\boxed{42}. Let me think step by step about the image. "
    "There are 3 red circles and 2 blue squares, so the total is 5. "
    "A triangle has three sides; a square has four. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } \\frac "
)


def make_tokenizer(
    out_dir: str | Path | None = None, *, corpus: Iterable[str] | str = DEFAULT_CORPUS, vocab_size: int = 384
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` with the Qwen special tokens first
    (ids 0..6). Saved with ``save_pretrained`` to ``out_dir`` when given. Every byte is in the vocabulary,
    so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(QWEN_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= 256 bytes + {len(QWEN_SPECIAL_TOKENS)} special tokens")
    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _prepare(out_dir: str | Path, force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"output dir {out} is not empty (pass force=True to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _padded_vocab(tokenizer, vocab_size: int | None) -> int:
    size = len(tokenizer)
    if vocab_size is None:
        return size
    if vocab_size < size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({size} tokens)")
    return vocab_size


def make_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int | None = 400,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    mrope_section: tuple[int, int, int] = (8, 12, 12),
    vision_depth: int = 2,
    vision_hidden: int = 64,
    tie_word_embeddings: bool = False,
    corpus: Iterable[str] | str = DEFAULT_CORPUS,
    force: bool = False,
) -> Path:
    """Write a random Qwen2.5-VL checkpoint folder (head_dim = hidden/heads; mrope_section sums to
    head_dim/2). ``vocab_size`` >= the tokenizer's size (None: exactly the tokenizer's)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    if sum(mrope_section) * 2 != hidden_size // num_heads:
        raise ValueError(f"mrope_section={list(mrope_section)} must sum to head_dim/2 = {hidden_size // num_heads // 2}")
    out = _prepare(out_dir, force)
    tokenizer = make_tokenizer(out, corpus=corpus, vocab_size=min(384, vocab_size or 384))
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    text = {
        "vocab_size": _padded_vocab(tokenizer, vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope_section)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [vision_depth - 1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    _perturb_norms(model, seed)
    model.save_pretrained(str(out))
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(str(out))
    return out


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int | None = 301,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    corpus: Iterable[str] | str = DEFAULT_CORPUS,
    force: bool = False,
) -> Path:
    """Write a random text-only Qwen2 checkpoint folder. The defaults exercise GQA (4 heads, 2 KV heads of
    head_dim 32), tied embeddings and vocabulary padding (301 tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = _prepare(out_dir, force)
    tokenizer = make_tokenizer(out, corpus=corpus, vocab_size=min(300, vocab_size or 300))
    config = Qwen2Config(
        vocab_size=_padded_vocab(tokenizer, vocab_size),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    _perturb_norms(model, seed)
    model.save_pretrained(str(out))
    return out


@torch.no_grad()
def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norm weights at 1 and biases at 0, which would hide a swapped or dropped
    tensor in conversion tests: give every parameter distinct values."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
