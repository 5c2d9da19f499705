"""Time and peak memory of HF <-> Megatron conversion of a random ~0.5B Qwen2-shaped model at TP=2.

    .venv/bin/python benchmarks/convert.py [--tp 2] [--pp 1] [--layers 24] [--dtype bfloat16] [--keep DIR]

Writes a random Qwen2-0.5B-shaped HF checkpoint (hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864,
vocab 151936, tied embeddings; bf16, one safetensors file per layer), converts it to a Megatron
dist-checkpoint and back with tp*pp gloo workers, checks the round trip is bit-exact, and prints per-rank
time and memory, in total and per phase (the steps of ``convert._hf_to_megatron_worker`` /
``_megatron_to_hf_worker``: build + load the HF weights, save the dist-checkpoint; build + load the
dist-checkpoint, export HF safetensors). Memory is each worker's RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs before the conversion) above its RSS after imports (torch, megatron, transformers),
compared with the full model, one rank's shard and one decoder layer; a phase's peak is the high-water
mark reached during it. Target: peak extra memory per rank about one shard plus one layer, not the whole
model. The baseline row is a naive single-process load of every tensor into memory (what a
non-streaming converter holds at least).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

GiB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class PeakMeter:
    """RSS high-water above the RSS at construction (Linux: writing 5 to clear_refs resets VmHWM), read at
    each ``mark``."""

    def __init__(self) -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        return _status_kib("VmHWM") * 1024 - self.base


def make_random_qwen2(out: Path, *, layers: int, dtype: torch.dtype) -> int:
    """Write the checkpoint tensor by tensor (never the whole model in memory); returns its byte size."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from mmupt_megatron.models import mapping as M

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: the test fixtures' tokenizer
    from tests.tiny_models import make_tokenizer

    hidden, heads, kv, ffn, vocab = 896, 14, 2, 4864, 151936
    head_dim = hidden // heads
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    make_tokenizer(out)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (0.02 * torch.randn(*shape, generator=gen)).to(dtype)

    shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden), "self_attn.k_proj.weight": (kv * head_dim, hidden),
        "self_attn.v_proj.weight": (kv * head_dim, hidden), "self_attn.q_proj.bias": (heads * head_dim,),
        "self_attn.k_proj.bias": (kv * head_dim,), "self_attn.v_proj.bias": (kv * head_dim,),
        "self_attn.o_proj.weight": (hidden, heads * head_dim), "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
    }
    files = [({M.HF_EMBEDDING: rand(vocab, hidden), M.HF_FINAL_NORM: rand(hidden)}, "model-embed.safetensors")]
    weight_map, total = {}, 0
    for index in range(-1, layers):
        if index < 0:
            tensors, name = files[0]
        else:
            tensors = {M.hf_layer_prefix(index) + key: rand(*shape) for key, shape in shapes.items()}
            name = f"model-layer{index:03d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def _imports() -> None:
    import megatron.core.models.gpt  # noqa: F401 - imports counted in the baseline, not the conversion
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401


def bench_to_megatron(hf_dir: str, out: str, tp: int, pp: int) -> dict:
    """``convert._hf_to_megatron_worker``, step by step."""
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.models.convert import build_model, hf_dtype, save_megatron_checkpoint
    from mmupt_megatron.models.hf_config import load_arch
    from mmupt_megatron.models.weights import load_hf_weights

    _imports()
    meter, start = PeakMeter(), time.perf_counter()
    arch = load_arch(hf_dir)
    groups = init_parallel(ParallelDims(tp=tp, pp=pp))
    model = build_model(arch, groups, dtype=hf_dtype(hf_dir))
    load_hf_weights(model, hf_dir)
    phases = {"load HF": meter.peak_extra()}
    save_megatron_checkpoint(model, out, hf_meta_dir=hf_dir)
    phases["save dist-ckpt"] = meter.peak_extra()
    return {"seconds": time.perf_counter() - start, "peak_extra": meter.peak_extra(), "phases": phases}


def bench_to_hf(ckpt: str, out: str, tp: int, pp: int) -> dict:
    """``convert._megatron_to_hf_worker``, step by step."""
    import torch.distributed as dist

    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.models.convert import (
        HF_SUBDIR,
        build_model,
        checkpoint_arch,
        copy_hf_metadata,
        load_megatron_checkpoint,
        read_checkpoint_meta,
    )
    from mmupt_megatron.models.weights import export_hf_weights

    _imports()
    meter, start = PeakMeter(), time.perf_counter()
    arch, meta = checkpoint_arch(ckpt), read_checkpoint_meta(ckpt)
    groups = init_parallel(ParallelDims(tp=tp, pp=pp))
    model = build_model(arch, groups, dtype=getattr(torch, meta["dtype"]))
    load_megatron_checkpoint(model, ckpt)
    phases = {"load dist-ckpt": meter.peak_extra()}
    export_hf_weights(model, out)
    if groups.rank == 0:
        copy_hf_metadata(Path(ckpt) / HF_SUBDIR, out)
    dist.barrier()
    phases["export HF"] = meter.peak_extra()
    return {"seconds": time.perf_counter() - start, "peak_extra": meter.peak_extra(), "phases": phases}


def naive_full_load(hf_dir: str) -> dict:
    from mmupt_megatron.models.weights import HFWeights

    _imports()
    meter, start = PeakMeter(), time.perf_counter()
    with HFWeights(hf_dir) as hf:
        state = {name: hf.get(name) for name in hf.names()}
    seconds = time.perf_counter() - start
    del state
    return {"seconds": seconds, "peak_extra": meter.peak_extra(), "phases": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--keep", default=None, help="work dir to keep (default: a temp dir, removed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mmupt_megatron.distributed.parallel import run_workers
    from mmupt_megatron.models.convert import prepare_output_dir
    from mmupt_megatron.models.weights import HFWeights

    work = Path(args.keep or tempfile.mkdtemp(prefix="convert_bench_"))
    hf_dir, ckpt, back = work / "hf", work / "ckpt", work / "back"
    for path in (hf_dir, ckpt, back):
        prepare_output_dir(path, force=True, inputs={}, kind="benchmark")
    model_bytes = make_random_qwen2(hf_dir, layers=args.layers, dtype=getattr(torch, args.dtype))
    world = args.tp * args.pp
    layer_bytes = sum(p.stat().st_size for p in hf_dir.glob("model-layer000.safetensors"))
    shard_bytes = model_bytes / world
    try:
        naive = run_workers(naive_full_load, world_size=1, args=(str(hf_dir),))[0]
        to_meg = run_workers(bench_to_megatron, world_size=world, args=(str(hf_dir), str(ckpt), args.tp, args.pp))
        to_hf = run_workers(bench_to_hf, world_size=world, args=(str(ckpt), str(back), args.tp, args.pp))
        with HFWeights(hf_dir) as a, HFWeights(back) as b:
            exact = sorted(a.names()) == sorted(b.names()) and all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nrandom Qwen2-shaped model: {model_bytes / GiB:.2f} GiB {args.dtype} ({args.layers} layers), "
          f"TP={args.tp} PP={args.pp}; shard {shard_bytes / GiB:.2f} GiB, layer {layer_bytes / GiB:.3f} GiB; "
          f"round trip bit-exact: {exact}")
    print(f"{'step':<38}{'rank':>5}{'time s':>9}{'peak extra GiB':>16}{'/ model':>9}{'/ (shard+layer)':>17}")
    rows = [("naive full load (baseline)", 0, naive)]
    rows += [("hf -> megatron", rank, r) for rank, r in enumerate(to_meg)]
    rows += [("megatron -> hf", rank, r) for rank, r in enumerate(to_hf)]
    for name, rank, r in rows:
        entries = [(name, r["seconds"], r["peak_extra"])]
        entries += [(f"  {phase} (high-water so far)", None, peak) for phase, peak in r["phases"].items()]
        for label, seconds, extra in entries:
            time_s = f"{seconds:9.1f}" if seconds is not None else f"{'':9}"
            print(f"{label:<38}{rank:>5}{time_s}{extra / GiB:>16.3f}{extra / model_bytes:>9.2f}"
                  f"{extra / (shard_bytes + layer_bytes):>17.2f}")


if __name__ == "__main__":  # required: workers are spawned and dist-checkpoint saving starts a process
    main()
