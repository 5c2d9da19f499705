"""Refit benchmark: bucketed Megatron -> engine weight streaming vs a plain copy and a naive full gather.

    .venv/bin/python benchmarks/refit.py            # Qwen2.5-0.5B shapes (494M params, fp32), TP=2
    .venv/bin/python benchmarks/refit.py --layers 2 # quick smoke run

Two gloo workers hold a random Qwen2-shaped text-only model (Qwen2.5-0.5B dimensions; random weights,
no checkpoint) at TP=2; a third process is the receiver. Rows, all in one run:
- ``bucketed shm|pipe``: ``send_refit`` — manifest offer, per-layer TP gather + un-fuse into a
  preallocated safetensors bucket on TP rank 0, then ``ShmSender`` (frame in shared memory, name through
  the pipe) or ``PipeSender`` (frame through the pipe); the receiver decodes every bucket into tensors
  (what runs before ``engine.load_weights``). No vLLM engine: starting one
  on a 0.5B model on 2 cores is too slow for a benchmark; the receiver stops where the engine would
  start copying, so engine load time (vLLM ``reload_weights``) is not included.
- ``naive full gather``: every layer gathered into one full HF state dict on rank 0 (``iter_hf_files``,
  what the trainer did before), ``safetensors.torch.save`` of the whole dict, one message, one load.
- ``plain copy (memcpy)``: the same number of bytes copied buffer to buffer in rank 0 — the physical
  ceiling on this machine; ``plain pipe``: the same bytes as raw 256 MiB messages to the receiver
  (the ceiling of any cross-process transport here); ``plain gloo``: half of the bytes from TP rank 1 to
  rank 0 with gloo send/recv — the TP gather any refit at TP=2 must do (gloo on CPU is TCP loopback).
  The floor for a TP=2 refit on this machine is therefore about plain gloo + plain copy.
Time is rank 0's wall clock from the start to the receiver's acknowledgement. Peak extra memory: the
rise of each process's RSS high-water mark (reset through /proc/self/clear_refs) above its RSS at the
start of the row, i.e. above the model shard. Targets: bucketed within 3x of the plain copy, peak extra
per rank about one bucket.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHUNK = 256 << 20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class PeakMeter:
    """RSS high-water above the RSS at construction (Linux: writing 5 to clear_refs resets VmHWM)."""

    def __init__(self) -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _rss_kib("VmRSS")

    def extra_bytes(self) -> int:
        return max(0, _rss_kib("VmHWM") - self.base) * 1024


def receiver_main(conn) -> None:
    """Serve sessions until told to stop; answer each with its byte count and peak extra RSS."""
    import torch
    from safetensors.torch import load as st_load

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from mmupt_megatron.engines.weight_transport import PipeReceiver

    while True:
        mode = json.loads(conn.recv_bytes())["mode"]
        if mode == "stop":
            return
        meter, nbytes = PeakMeter(), 0
        if mode == "bucketed":
            receiver = PipeReceiver(conn)
            receiver.manifest()
            receiver.answer(None)
            for entries, tensors in receiver.buckets():
                nbytes += sum(t.numel() * t.element_size() for _, t in tensors)
                del tensors
        elif mode == "naive":
            tensors = st_load(conn.recv_bytes())
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        elif mode == "pipe":
            while (size := len(conn.recv_bytes())) > 0:
                nbytes += size
        conn.send_bytes(json.dumps({"bytes": nbytes, "peak": meter.extra_bytes()}).encode())


def _session(conn, mode: str) -> None:
    conn.send_bytes(json.dumps({"mode": mode}).encode())


def bench_worker(layers: int, bucket_sizes: list[int], conn) -> list[dict]:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save as st_save

    from mmupt_megatron.engines.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.weight_sync import send_refit
    from mmupt_megatron.engines.weight_transport import PipeSender, ShmSender
    from mmupt_megatron.models.hf_config import LMArch
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel
    from mmupt_megatron.models.weights import iter_hf_files

    groups = init_parallel(ParallelDims(tp=2))
    arch = LMArch(model_type="qwen2", hidden_size=896, num_layers=layers, num_attention_heads=14, num_kv_heads=2,
                  head_dim=64, ffn_hidden_size=4864, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
    model = Qwen2_5_VLModel(arch, groups, dtype=torch.float32, init_weights=False)
    gen = torch.Generator().manual_seed(groups.rank)
    with torch.no_grad():
        for param in model.parameters():  # touch every page: the shard is resident before measuring
            param.normal_(0.0, 0.02, generator=gen)
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sender_rank = groups.tp_rank == 0
    rows = []

    def finish(name: str, start: float, meter: PeakMeter, sent: int) -> None:
        ack = json.loads(conn.recv_bytes()) if sender_rank else {}
        seconds = time.perf_counter() - start
        peaks = [None] * groups.world_size
        dist.all_gather_object(peaks, meter.extra_bytes())
        rows.append({"name": name, "seconds": seconds, "bytes": ack.get("bytes", sent), "peaks": peaks,
                     "receiver_peak": ack.get("peak"), "shard": shard_bytes})

    for transport in ("shm", "pipe"):
        for bucket in bucket_sizes:
            dist.barrier()
            meter, start = PeakMeter(), time.perf_counter()
            if sender_rank:
                _session(conn, "bucketed")
            sender = (ShmSender if transport == "shm" else PipeSender)(conn) if sender_rank else None
            stats = send_refit(model, sender, bucket_bytes=bucket)
            model_bytes = sum(layout.nbytes for layout in stats.plan)  # the same on every rank
            finish(f"bucketed {transport} {bucket >> 20} MiB ({stats.num_buckets or '-'} b.)", start, meter,
                   model_bytes)

    dist.barrier()
    meter, start = PeakMeter(), time.perf_counter()
    full = {}
    for _, tensors in iter_hf_files(model):
        full.update(tensors)
    if sender_rank:
        _session(conn, "naive")
        blob = st_save(full)
        del full
        conn.send_bytes(blob)
        del blob
    finish("naive full gather", start, meter, 0)
    total = model_bytes

    dist.barrier()  # the TP=2 floor: half of the bytes must cross from rank 1 to rank 0 over gloo
    half, start = model_bytes // 2, time.perf_counter()
    chunk = torch.empty(CHUNK, dtype=torch.uint8).fill_(1)
    for done in range(0, half, CHUNK):
        piece = chunk[: min(CHUNK, half - done)]
        dist.recv(piece, src=1) if sender_rank else dist.send(piece, dst=0)
    if sender_rank:
        rows.append({"name": "plain gloo (half the bytes, TP peer)", "seconds": time.perf_counter() - start,
                     "bytes": half, "peaks": None, "receiver_peak": None, "shard": shard_bytes})
    del chunk
    dist.barrier()
    meter, start = PeakMeter(), time.perf_counter()
    if sender_rank:
        src, dst = torch.empty(CHUNK, dtype=torch.uint8).fill_(1), torch.empty(CHUNK, dtype=torch.uint8).fill_(0)
        meter = PeakMeter()
        start = time.perf_counter()
        for done in range(0, total, CHUNK):
            dst[: min(CHUNK, total - done)].copy_(src[: min(CHUNK, total - done)])
        rows.append({"name": "plain copy (memcpy)", "seconds": time.perf_counter() - start, "bytes": total,
                     "peaks": None, "receiver_peak": None, "shard": shard_bytes})
        buffer = bytearray(CHUNK)
        _session(conn, "pipe")
        start = time.perf_counter()
        for done in range(0, total, CHUNK):
            conn.send_bytes(buffer, 0, min(CHUNK, total - done))
        conn.send_bytes(b"")
        ack = json.loads(conn.recv_bytes())
        rows.append({"name": "plain pipe (raw bytes)", "seconds": time.perf_counter() - start, "bytes": ack["bytes"],
                     "peaks": None, "receiver_peak": ack["peak"], "shard": shard_bytes})
        _session(conn, "stop")
    dist.barrier()
    return rows


def _fmt_mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24 = Qwen2.5-0.5B)")
    parser.add_argument("--bucket-mib", type=int, nargs="+", default=[256, 64])
    args = parser.parse_args()

    from mmupt_megatron.engines.parallel import run_workers

    ctx = torch.multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    receiver = ctx.Process(target=receiver_main, args=(theirs,))
    receiver.start()
    buckets = [mib << 20 for mib in args.bucket_mib]
    rows = run_workers(bench_worker, world_size=2, args=(args.layers, buckets, ours), timeout_s=1800)[0]
    receiver.join(timeout=30)
    copy = next(r for r in rows if r["name"].startswith("plain copy"))
    params = rows[0]["bytes"] // 4
    print(f"\nrefit benchmark: Qwen2-shaped {params / 1e6:.0f}M params fp32 ({rows[0]['bytes'] / 2**30:.2f} GiB), "
          f"TP=2 on {os.cpu_count()} cores, model shard per rank {rows[0]['shard'] / 2**20:,.0f} MiB\n")
    header = f"{'method':34} {'time s':>7} {'GiB moved':>9} {'GB/s':>6} {'x copy':>7} {'extra MiB r0':>12} {'r1':>6} {'receiver':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        peaks = row["peaks"] or [None, None]
        print(f"{row['name']:34} {row['seconds']:7.2f} {row['bytes'] / 2**30:9.2f} {row['bytes'] / row['seconds'] / 1e9:6.2f} "
              f"{row['seconds'] / copy['seconds']:7.1f} {_fmt_mib(peaks[0]):>12} {_fmt_mib(peaks[1]):>6} "
              f"{_fmt_mib(row['receiver_peak']):>9}")


if __name__ == "__main__":
    main()
