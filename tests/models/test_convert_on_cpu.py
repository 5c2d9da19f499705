"""HF -> Megatron dist-checkpoint -> HF is bit-exact at TP=1/2 and PP=1/2 and at TP=2 x PP=2 together
(4 workers); a checkpoint saved at TP=2 loads at TP=1 and at PP=2, and one saved at TP=2 x PP=2 at TP=1
and TP=2 x DP=2, with identical logits; the public conversion API gives a folder transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmupt_megatron.distributed.parallel import ParallelDims, run_workers
from mmupt_megatron.models.convert import hf_to_megatron, megatron_to_hf
from tests.tiny_models import make_tiny_qwen2, make_tiny_qwen2_5_vl
from mmupt_megatron.models.weights import HFWeights
from tests.models.test_qwen2_5_vl_on_cpu import pipeline_forward
from tests.models.tiny_inputs import hf_logits, image_prompt_batch

SAVE_LAYOUTS = ((2, 1, 1), (1, 2, 1), (1, 1, 2))


def assert_same_hf_weights(src: Path, dst: Path) -> None:
    with HFWeights(src) as a, HFWeights(dst) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            x, y = a.get(name), b.get(name)
            assert x.dtype == y.dtype and torch.equal(x, y), name


def round_trip_worker(hf_dir: str, work: str, inputs: tuple) -> dict:
    import torch.distributed as dist

    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models.convert import build_model, load_megatron_checkpoint, save_megatron_checkpoint
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.weights import export_hf_weights, load_hf_weights

    arch = load_arch(hf_dir)
    logits = {}
    for tp, pp, dp in SAVE_LAYOUTS:
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        tag = f"tp{tp}pp{pp}dp{dp}"
        model = build_model(arch, groups, dtype=torch.float32)
        load_hf_weights(model, hf_dir)
        save_megatron_checkpoint(model, Path(work) / f"ckpt_{tag}", hf_meta_dir=hf_dir)
        del model
        fresh = build_model(arch, groups, dtype=torch.float32, init_weights=True)  # random until loaded
        load_megatron_checkpoint(fresh, Path(work) / f"ckpt_{tag}")
        (Path(work) / f"hf_{tag}").mkdir(exist_ok=True)
        dist.barrier()
        export_hf_weights(fresh, Path(work) / f"hf_{tag}")
        dist.barrier()
        logits[("saved", tag)] = pipeline_forward(groups, fresh, *inputs)
    # The TP=2 checkpoint, loaded at the other layouts.
    for tp, pp, dp in SAVE_LAYOUTS[1:]:
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        model = build_model(arch, groups, dtype=torch.float32, init_weights=True)
        load_megatron_checkpoint(model, Path(work) / "ckpt_tp2pp1dp1")
        logits[("from_tp2", f"tp{tp}pp{pp}dp{dp}")] = pipeline_forward(groups, model, *inputs)
    return logits


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2"])
def test_round_trip_bit_exact_and_tp2_checkpoint_loads_elsewhere(tmp_path, kind):
    if kind == "qwen2_5_vl":
        hf_dir = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=3)
        inputs = image_prompt_batch(hf_dir, tmp_path / "image.png")
    else:  # tied embeddings, GQA, vocabulary padded 301 -> 384
        hf_dir = make_tiny_qwen2(tmp_path / "hf", seed=4)
        inputs = (torch.randint(10, 290, (2, 9), generator=torch.Generator().manual_seed(1)),)
    per_rank = run_workers(round_trip_worker, world_size=2, args=(str(hf_dir), str(tmp_path), inputs))
    for tp, pp, dp in SAVE_LAYOUTS:
        assert_same_hf_weights(hf_dir, tmp_path / f"hf_tp{tp}pp{pp}dp{dp}")
    reference = per_rank[0][("saved", "tp2pp1dp1")]
    assert (reference - hf_logits(hf_dir, *inputs)).abs().max() < 1e-5
    compared = 0
    for rank_logits in per_rank:
        for key, got in rank_logits.items():
            if got is not None and key[0] == "from_tp2":
                assert torch.allclose(got, reference, atol=1e-5, rtol=0), key
                compared += 1
    assert compared == 3  # tp1 x dp2: both ranks; pp2: the last stage


def tp2_pp2_worker(hf_dir: str, work: str, ids: torch.Tensor) -> dict:
    import torch.distributed as dist

    from mmupt_megatron.distributed.parallel import init_parallel
    from mmupt_megatron.models import convert
    from mmupt_megatron.models.convert import build_model, load_megatron_checkpoint, save_megatron_checkpoint
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.weights import export_hf_weights, load_hf_weights

    # tiny row blocks, as the 32 MiB default makes of a real vocabulary: saved on a finer grid, resharded on load
    convert.CHECKPOINT_BLOCK_BYTES = 4096
    arch = load_arch(hf_dir)
    groups = init_parallel(ParallelDims(tp=2, pp=2))
    model = build_model(arch, groups, dtype=torch.float32)
    load_hf_weights(model, hf_dir)
    assert any(isinstance(value, list) and len(value) > 2 for value in convert.checkpoint_state(model).values())
    save_megatron_checkpoint(model, Path(work) / "ckpt", hf_meta_dir=hf_dir)
    del model
    fresh = build_model(arch, groups, dtype=torch.float32, init_weights=True)
    load_megatron_checkpoint(fresh, Path(work) / "ckpt")
    (Path(work) / "back").mkdir(exist_ok=True)
    dist.barrier()
    export_hf_weights(fresh, Path(work) / "back")
    dist.barrier()
    logits = {"tp2pp2": pipeline_forward(groups, fresh, ids)}
    for tp, pp, dp in ((1, 1, 4), (2, 1, 2)):
        groups = init_parallel(ParallelDims(tp=tp, pp=pp, dp=dp))
        model = build_model(arch, groups, dtype=torch.float32, init_weights=True)
        load_megatron_checkpoint(model, Path(work) / "ckpt")
        logits[f"tp{tp}pp{pp}dp{dp}"] = pipeline_forward(groups, model, ids)
    return logits


@pytest.mark.distributed
def test_round_trip_bit_exact_at_tp2_pp2(tmp_path):
    hf_dir = make_tiny_qwen2(tmp_path / "hf", seed=6)  # tied embeddings: the last stage holds a copy
    ids = torch.randint(10, 290, (2, 9), generator=torch.Generator().manual_seed(3))
    per_rank = run_workers(tp2_pp2_worker, world_size=4, args=(str(hf_dir), str(tmp_path), ids))
    assert_same_hf_weights(hf_dir, tmp_path / "back")
    reference = hf_logits(hf_dir, ids)
    got = [(key, value) for rank_logits in per_rank for key, value in rank_logits.items() if value is not None]
    assert sorted({key for key, _ in got}) == ["tp1pp1dp4", "tp2pp1dp2", "tp2pp2"]
    assert all((value - reference).abs().max() < 1e-5 for _, value in got)


@pytest.mark.slow
def test_public_api_single_process(tmp_path):
    hf_dir = make_tiny_qwen2(tmp_path / "hf", seed=5, vocab_size=None, tie_word_embeddings=False)
    ckpt = hf_to_megatron(hf_dir, tmp_path / "ckpt", tp=1, pp=1)
    assert (ckpt / "megatron" / "metadata.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="is not empty"):
        hf_to_megatron(hf_dir, ckpt, tp=1, pp=1)
    back = megatron_to_hf(ckpt, tmp_path / "back")
    assert_same_hf_weights(hf_dir, back)
    ids = torch.randint(10, 250, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(hf_logits(back, ids), hf_logits(hf_dir, ids))  # transformers loads the sharded folder
