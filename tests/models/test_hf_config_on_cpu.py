"""Reading HF configs, the tiny checkpoints, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims
from mmupt_megatron.models.convert import hf_to_megatron, megatron_to_hf, prepare_output_dir
from mmupt_megatron.models.hf_config import load_arch
from tests.tiny_models import (
    QWEN_SPECIAL_TOKENS,
    make_tiny_qwen2,
    make_tiny_qwen2_5_vl,
    make_tokenizer,
)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl"), seed=0)


def test_tiny_vl_checkpoint_reads_and_loads(vl_dir):
    arch = load_arch(vl_dir)
    assert (arch.model_type, arch.hidden_size, arch.num_layers, arch.head_dim) == ("qwen2_5_vl", 128, 2, 64)
    assert arch.mrope_section == (8, 12, 12) and arch.is_multimodal and arch.qkv_bias
    assert not arch.tie_word_embeddings and arch.vocab_size == 400
    assert (vl_dir / "preprocessor_config.json").is_file()
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vl_dir)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == arch.image_token_id
    model = AutoModelForImageTextToText.from_pretrained(vl_dir)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tokenizer_from_a_word_list(tmp_path):
    words = ["red", "circle", "square", "answer", "boxed"] * 20
    tokenizer = make_tokenizer(tmp_path, corpus=" ".join(words), vocab_size=300)
    assert [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(len(QWEN_SPECIAL_TOKENS)))
    ids = tokenizer("a red circle")["input_ids"]
    assert tokenizer.decode(ids) == "a red circle"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_text_only_qwen2(tmp_path):
    arch = load_arch(make_tiny_qwen2(tmp_path, seed=0))
    assert (arch.model_type, arch.num_attention_heads, arch.num_kv_heads, arch.vocab_size) == ("qwen2", 4, 2, 301)
    assert arch.tie_word_embeddings and arch.mrope_section is None and not arch.is_multimodal


def test_not_a_qwen_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"not a Qwen2 / Qwen2.5-VL checkpoint.*model_type='llama'") as err:
        load_arch(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="config.json does not exist"):
        load_arch(tmp_path / "nothing")


def test_missing_safetensors(tmp_path, vl_dir):
    (tmp_path / "config.json").write_text((vl_dir / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*.safetensors weights in .*pytorch_model.bin"):
        load_arch(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        hf_to_megatron(tmp_path, tmp_path / "out", tp=1, pp=1)


def test_parallel_layout_errors_name_every_degree():
    with pytest.raises(ValueError, match="does not divide") as err:
        ParallelDims(tp=3, pp=4, dp=1).validate(world_size=8, num_attention_heads=2, num_kv_heads=2, num_layers=2)
    message = str(err.value)
    for fragment in ("tp=3 does not divide num_attention_heads=2", "tp=3 does not divide num_key_value_heads=2",
                     "pp=4 does not divide num_hidden_layers=2", "= 12 != world_size=8"):
        assert fragment in message
    ParallelDims(tp=2, pp=2, dp=2).validate(world_size=8, num_attention_heads=4, num_kv_heads=2, num_layers=4)
    with pytest.raises(ValueError, match="tp=0 must be >= 1"):
        ParallelDims(tp=0).validate(world_size=1, num_attention_heads=2, num_kv_heads=2, num_layers=2)


def test_conversion_rejects_tp_not_dividing_heads_before_spawning(tmp_path, vl_dir):
    with pytest.raises(ValueError, match="tp=4 does not divide num_attention_heads=2"):
        hf_to_megatron(vl_dir, tmp_path / "out", tp=4, pp=1)
    assert not (tmp_path / "out").exists()


def test_output_dir_must_be_empty_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=f"--out {out} is not empty"):
        prepare_output_dir(out, force=False, inputs={}, kind="test")
    assert (out / "keep.txt").exists()
    with pytest.raises(ValueError, match="was not written by mmupt"):  # --force replaces only our own outputs
        prepare_output_dir(out, force=True, inputs={}, kind="test")
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    prepare_output_dir(out, force=False, inputs={}, kind="test")
    (out / "partial.bin").write_text("x")  # what an earlier (maybe killed) conversion wrote
    prepare_output_dir(out, force=True, inputs={}, kind="test")
    assert [p.name for p in out.iterdir()] == [".mmupt-output"]
    with pytest.raises(ValueError, match="is not a complete mmupt Megatron checkpoint"):
        megatron_to_hf(tmp_path / "missing", tmp_path / "hf")
