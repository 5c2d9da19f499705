"""Refit benchmark: bucketed Megatron -> engine weight streaming vs a plain copy and a naive full gather.

    .venv/bin/python benchmarks/refit.py            # Qwen2.5-0.5B shapes (494M params, fp32), TP=2
    .venv/bin/python benchmarks/refit.py --layers 2 # quick smoke run

Two gloo workers hold a random Qwen2-shaped text-only model (Qwen2.5-0.5B dimensions; random weights,
no checkpoint) at TP=2; a third process is the receiver. Rows, all in one run:
- ``shm shared``: ``send_refit`` through ``ShmSender`` — manifest offer, then for each bucket both TP
  ranks map the shared-memory bucket and write their own pieces into it (un-fused by slicing; no TP
  gather), a TP barrier, and the segment's name goes through the pipe. ``shm gloo-gather``: the same
  transport with sharing disabled: TP rank 0 receives rank 1's pieces into the bucket over gloo while it
  copies its own (what any transport whose buffer the peers cannot map does). ``pipe gloo-gather``:
  ``PipeSender``, the frame through the pipe as raw bytes. The receiver (``PipeReceiver(reuse_buffers=
  True)``) decodes every bucket into tensors, views of the segment / receive buffer: what runs before
  ``engine.load_weights``. ``cold``: the first refit through a new sender (its buffers are allocated and
  first touched); ``warm``: the next refit through the same sender and receiver (what every training
  step after the first pays). No vLLM engine: starting one on a 0.5B model on 2 cores is too slow for a
  benchmark.
- ``ipc handle``: ``send_refit`` through ``HandleSender`` (the ``rollout.refit_transport=ipc`` path): the bucket is
  one tensor on the sender's device shared by handle (``vllm_worker.share_tensor``), the receiver opens it
  (``open_shared``) and decodes it in place. With CUDA present the bucket is on the GPU and the handle a CUDA IPC
  handle (the packing then includes the host-to-device copy of this benchmark's CPU-resident shards: on a
  GPU-resident policy it is a device copy). Only with CUDA present: on CPU the same row (a ``file_system``
  shared-memory handle) failed in this benchmark's process layout — the receiver could not open the sender's
  ``/dev/shm/torch_*`` file, not understood yet — while the trainer's CPU test of ``rollout.refit_transport=ipc``
  (small buckets, vLLM's worker process) passes; on CPU the trainer's ``auto`` never picks ``ipc``.
- ``+engine copy``: the receiver also copies every tensor into preallocated, resident tensors of the
  model's size (the copy ``load_weights`` makes into the engine's parameters; vLLM's own post-load
  processing is not included), with 1 or 2 shared-memory buffers (2: bucket k+1 is filled while the
  engine copies k).
- ``naive full gather``: every layer gathered into one full HF state dict on rank 0 (``iter_hf_files``),
  ``safetensors.torch.save`` of the whole dict, one message, one load.
- ``plain copy (memcpy)``: the same number of bytes copied buffer to buffer in rank 0 (resident
  buffers) — the physical ceiling on this machine; ``plain pipe``: the same bytes as raw 256 MiB
  messages to the receiver; ``plain gloo``: half of the bytes from TP rank 1 to rank 0 with gloo
  send/recv into a resident buffer — the TP gather any refit at TP=2 over gloo must do (gloo on CPU is
  TCP loopback). The floor of a gloo-gather TP=2 refit is therefore about plain gloo + half a plain copy
  (rank 0's own half); the shared-memory refit's is half a plain copy (both ranks copy their halves at
  once, one per core); the engine's own copy comes on top of either.
Time is rank 0's wall clock from the start to the receiver's acknowledgement; ``warm`` rows and the plain
baselines are the median of ``--repeats`` runs (this machine is shared: single runs swing by 2x). Peak extra memory: the
rise of each process's RSS high-water mark (reset through /proc/self/clear_refs) above its RSS before
the row — for ``warm`` rows above its RSS before the ``cold`` row, so the buffers and mappings kept from
the cold refit count (the receiver too). Shared-memory pages count in both the sender's and the receiver's RSS. Targets: bucketed
within 3x of the plain copy, peak extra per rank about one bucket (the largest bucket: the embedding,
a layer group of its own, is larger than 256 MiB here).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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
    """RSS high-water above the RSS at construction, or above ``base_kib`` (Linux: writing 5 to
    clear_refs resets VmHWM to the current RSS)."""

    def __init__(self, base_kib: int | None = None) -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _rss_kib("VmRSS") if base_kib is None else base_kib

    def extra_bytes(self) -> int:
        return max(0, _rss_kib("VmHWM") - self.base) * 1024


def receiver_main(conn) -> None:
    """Serve sessions until told to stop; answer each with its byte count and peak extra RSS."""
    import torch
    from safetensors.torch import load as st_load

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from mmupt_megatron.engines.weight_transport import PipeReceiver

    receiver = None
    engine: dict = {}  # stand-in for the engine's parameters (resident before any timed session)
    cold_base = None
    while True:
        message = json.loads(conn.recv_bytes())
        mode = message["mode"]
        if mode == "stop":
            return
        if mode == "engine-setup":
            for name, shape, dtype in message["tensors"]:
                engine[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
            conn.send_bytes(b"{}")
            continue
        if not message.get("warm"):
            receiver = PipeReceiver(conn, reuse_buffers=True)  # kept for the warm session: mappings, buffers
        meter, nbytes = PeakMeter(cold_base if message.get("warm") else None), 0
        cold_base = meter.base
        if mode in ("bucketed", "bucketed-engine"):
            nbytes = _receive(receiver, engine if mode == "bucketed-engine" else None)
        elif mode == "ipc":
            nbytes = _receive_handles(conn)
        elif mode == "naive":
            tensors = st_load(conn.recv_bytes())
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        elif mode == "pipe":
            while (size := len(conn.recv_bytes())) > 0:
                nbytes += size
        conn.send_bytes(json.dumps({"bytes": nbytes, "peak": meter.extra_bytes()}).encode())


def _receive(receiver, engine: dict | None) -> int:
    """One refit into ``engine`` (or decode only); no view of a bucket outlives it."""
    receiver.manifest()
    receiver.answer(None)
    nbytes = 0
    for _, tensors in receiver.buckets():
        for name, tensor in tensors:
            if engine is not None:
                engine[name].copy_(tensor)
            nbytes += tensor.numel() * tensor.element_size()
    return nbytes


def _receive_handles(conn) -> int:
    """One refit by handle: (handle, frame size) per bucket until an empty message; each bucket is opened and
    decoded in place, then acknowledged (the sender may overwrite it)."""
    import pickle

    import torch

    from mmupt_megatron.engines.vllm_worker import open_shared
    from mmupt_megatron.engines.weight_transport import decode_bucket

    nbytes = 0
    while message := conn.recv_bytes():
        handle, size = pickle.loads(message)  # noqa: S301 - our own sender's handle
        _, tensors = decode_bucket(open_shared(handle)[:size])
        nbytes += sum(tensor.numel() * tensor.element_size() for _, tensor in tensors)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        conn.send_bytes(b"ok")
    return nbytes


def _session(conn, mode: str, *, warm: bool = False) -> None:
    conn.send_bytes(json.dumps({"mode": mode, "warm": warm}).encode())


def bench_worker(layers: int, bucket_sizes: list[int], repeats: int, conn) -> list[dict]:
    import pickle

    import torch
    import torch.distributed as dist
    from safetensors.torch import save as st_save

    from mmupt_megatron.engines.device_transport import HandleSender

    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.weight_sync import release_peer_mappings, send_refit
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

    def finish(name: str, start: float, meter: PeakMeter, sent: int, largest: int | None = None) -> dict:
        ack = json.loads(conn.recv_bytes()) if sender_rank else {}
        seconds = time.perf_counter() - start
        peaks = [None] * groups.world_size
        dist.all_gather_object(peaks, meter.extra_bytes())
        row = {"name": name, "seconds": seconds, "bytes": ack.get("bytes", sent), "peaks": peaks,
               "receiver_peak": ack.get("peak"), "shard": shard_bytes, "largest": largest}
        rows.append(row)
        return row

    def median_of(runs: list[dict], name: str) -> None:
        """Replace the rows of ``runs`` by one: median time, highest peaks."""
        del rows[-len(runs) :]
        peaks = [max(r["peaks"][rank] for r in runs) for rank in range(groups.world_size)]
        receiver = max((r["receiver_peak"] or 0 for r in runs), default=None) if runs[0]["receiver_peak"] is not None else None
        rows.append({**runs[0], "name": name, "seconds": statistics.median(r["seconds"] for r in runs), "peaks": peaks,
                     "receiver_peak": receiver})

    def _release(sender) -> None:
        """Unlink the sender's segments and drop rank 1's mappings of them (else they stay allocated and
        inflate the next row's base)."""
        if sender is not None and hasattr(sender, "release"):
            sender.release()
        dist.barrier()
        release_peer_mappings()

    def bucketed(name: str, sender, bucket: int, *, mode: str = "bucketed", base_kib: int | None = None) -> int:
        """One refit (cold), or ``repeats`` of them (warm, through the same sender: median time)."""
        runs = []
        for _ in range(1 if base_kib is None else repeats):
            dist.barrier()
            meter, start = PeakMeter(base_kib), time.perf_counter()
            if sender_rank:
                _session(conn, mode, warm=base_kib is not None)
            stats = send_refit(model, sender, bucket_bytes=bucket)
            model_bytes = sum(layout.nbytes for layout in stats.plan)  # the same on every rank
            largest = max(layout.nbytes for layout in stats.plan)
            runs.append(finish(f"{name} {bucket >> 20} MiB ({len(stats.plan)} b.)", start, meter, model_bytes, largest))
        if len(runs) > 1:
            median_of(runs, f"{name} {bucket >> 20} MiB ({len(stats.plan)} b., med. {len(runs)})")
        return meter.base

    class GatherShmSender(ShmSender):
        share = None  # no shared bucket: the TP peers' pieces are gathered over gloo

    class PipeHandleSender(HandleSender):
        """``HandleSender`` whose handles go through the pipe; an empty message ends the refit."""

        def __init__(self, conn) -> None:
            def notify(handle: bytes, size: int) -> None:
                conn.send_bytes(pickle.dumps((handle, size)))
                conn.recv_bytes()  # decoded: the bucket may be overwritten

            super().__init__(offer=lambda manifest: None, notify=notify)
            self.conn = conn

        def close(self) -> None:
            self.conn.send_bytes(b"")

    variants = [("shm shared", ShmSender, "bucketed"), ("shm gloo-gather", GatherShmSender, "bucketed"),
                ("pipe gloo-gather", PipeSender, "bucketed")]
    if torch.cuda.is_available():  # see the module docstring: on CPU the handle row is not run
        variants.insert(1, ("ipc cuda handle", PipeHandleSender, "ipc"))
    for index, bucket in enumerate(bucket_sizes):
        for label, make, mode in variants if index == 0 else variants[: len(variants) - 1]:
            sender = make(conn) if sender_rank else None
            base = bucketed(f"{label} cold", sender, bucket, mode=mode)
            bucketed(f"{label} warm", sender, bucket, mode=mode, base_kib=base)
            _release(sender)
    if sender_rank:  # the receiver's stand-in engine parameters, resident before the timed sessions
        from mmupt_megatron.engines.weight_sync import refit_manifest

        tensors = [[e.name, list(e.shape), "float32"] for _, group in refit_manifest(model) for e in group]
        conn.send_bytes(json.dumps({"mode": "engine-setup", "tensors": tensors}).encode())
        conn.recv_bytes()
    for buffers in (1, 2):
        sender = ShmSender(conn, num_buffers=buffers) if sender_rank else None
        base = bucketed(f"shm shared +engine copy {buffers}buf cold", sender, bucket_sizes[0], mode="bucketed-engine")
        bucketed(f"shm shared +engine copy {buffers}buf warm", sender, bucket_sizes[0], mode="bucketed-engine",
                 base_kib=base)
        _release(sender)
    model_bytes = rows[0]["bytes"]

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
    finish("naive full gather", start, meter, model_bytes)

    dist.barrier()  # the TP=2 floor: half of the bytes must cross from rank 1 to rank 0 over gloo
    half = model_bytes // 2
    chunk = torch.empty(CHUNK, dtype=torch.uint8).fill_(1)  # resident on both sides, like the refit's buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for done in range(0, half, CHUNK):
            piece = chunk[: min(CHUNK, half - done)]
            dist.recv(piece, src=1) if sender_rank else dist.send(piece, dst=0)
        times.append(time.perf_counter() - start)
    if sender_rank:
        rows.append({"name": f"plain gloo (half the bytes; med. {repeats})",
                     "seconds": statistics.median(times), "bytes": half, "peaks": None, "receiver_peak": None,
                     "shard": shard_bytes, "largest": None})
    del chunk
    dist.barrier()
    total = model_bytes
    if sender_rank:
        src, dst = torch.empty(CHUNK, dtype=torch.uint8).fill_(1), torch.empty(CHUNK, dtype=torch.uint8).fill_(0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for done in range(0, total, CHUNK):
                dst[: min(CHUNK, total - done)].copy_(src[: min(CHUNK, total - done)])
            times.append(time.perf_counter() - start)
        rows.append({"name": f"plain copy (memcpy; med. {repeats})", "seconds": statistics.median(times),
                     "bytes": total, "peaks": None, "receiver_peak": None, "shard": shard_bytes, "largest": None})
        buffer = bytearray(b"\x01") * CHUNK  # resident
        _session(conn, "pipe")
        start = time.perf_counter()
        for done in range(0, total, CHUNK):
            conn.send_bytes(buffer, 0, min(CHUNK, total - done))
        conn.send_bytes(b"")
        ack = json.loads(conn.recv_bytes())
        rows.append({"name": "plain pipe (raw bytes)", "seconds": time.perf_counter() - start, "bytes": ack["bytes"],
                     "peaks": None, "receiver_peak": ack["peak"], "shard": shard_bytes, "largest": None})
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
    parser.add_argument("--repeats", type=int, default=3, help="warm refits and plain baselines: median of this many")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    from mmupt_megatron.distributed.parallel import run_workers

    ctx = torch.multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    receiver = ctx.Process(target=receiver_main, args=(theirs,))
    receiver.start()
    buckets = [mib << 20 for mib in args.bucket_mib]
    rows = run_workers(bench_worker, world_size=2, args=(args.layers, buckets, args.repeats, ours), timeout_s=1800)[0]
    receiver.join(timeout=30)
    copy = next(r for r in rows if r["name"].startswith("plain copy"))
    params = rows[0]["bytes"] // 4
    print(f"\nrefit benchmark: Qwen2-shaped {params / 1e6:.0f}M params fp32 ({rows[0]['bytes'] / 2**30:.2f} GiB), "
          f"TP=2 on {os.cpu_count()} cores, model shard per rank {rows[0]['shard'] / 2**20:,.0f} MiB\n")
    header = (f"{'method':56} {'time s':>7} {'GiB':>5} {'GB/s':>6} {'x copy':>7} {'extra MiB r0':>12} {'r1':>6} "
              f"{'receiver':>9} {'r0 / bucket':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        peaks = row["peaks"] or [None, None]
        per_bucket = f"{peaks[0] / row['largest']:.2f}" if row.get("largest") and peaks[0] is not None else "-"
        print(f"{row['name']:56} {row['seconds']:7.2f} {row['bytes'] / 2**30:5.2f} {row['bytes'] / row['seconds'] / 1e9:6.2f} "
              f"{row['seconds'] / copy['seconds']:7.1f} {_fmt_mib(peaks[0]):>12} {_fmt_mib(peaks[1]):>6} "
              f"{_fmt_mib(row['receiver_peak']):>9} {per_bucket:>11}")
    largest = max(row["largest"] or 0 for row in rows)
    print(f"\nr0 / bucket: rank 0's peak extra over the largest bucket of the row's plan ({largest / 2**20:,.0f} MiB at "
          f"most: the fp32 embedding, a layer group of its own)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
