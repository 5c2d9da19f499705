"""How refit buckets travel from the Megatron ranks to the rollout engine: the transport interface and its
CPU implementation (safetensors bytes through a ``multiprocessing`` connection, or any byte carrier).

A bucket is one flat byte buffer plus a layout (name, dtype, shape, offset of each tensor, whole layers
only; see ``weight_sync``). Each side of a transport has four calls:

    sender (TP rank 0 of each pipeline stage)        receiver (next to the engine, one per stage)
    offer(manifest) -> refusal or None    <------>   manifest() ... answer(refusal or None)
    buffer(layout) -> flat uint8 tensor              buckets() -> (bucket manifest, (name, tensor) pairs)
    send(layout)                          ------->
    close()

so a CUDA-IPC or NCCL transport (device buffer, handle or broadcast) plugs in without touching the
trainer or the packing code. The CPU ones write each bucket *directly* into a preallocated safetensors
frame (header from the layout, then the data section the packer fills), so the sender's extra memory is
one bucket and no tensor is ever pickled; ``decode_bucket`` reads a frame back as views (any safetensors
reader, e.g. ``safetensors.torch.load``, reads the same bytes). ``PipeSender`` sends the frame through
the connection; ``ShmSender`` writes it into shared memory and sends only its name (the CPU analogue of
CUDA IPC; ~6x faster here). The same frames can ride the Ray object store (``SafetensorsBuckets.take``
on the sender, ``decode_bucket`` on the engine actor). Control messages (manifest, answer, end) are JSON.

Pipes rather than ``multiprocessing.Queue``: a queue pickles every message into a second copy before
writing it; ``Connection.send_bytes`` writes from the buffer itself and ``recv_bytes_into`` reads
straight into the frame.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Protocol

import torch

_ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One tensor the refit will send: HF name, full shape, safetensors dtype string."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * _ITEM_SIZE[self.dtype]

    def to_json(self) -> list:
        return [self.name, list(self.shape), self.dtype]

    @classmethod
    def from_json(cls, item: list) -> ManifestEntry:
        return cls(item[0], tuple(item[1]), item[2])

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> ManifestEntry:
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"refit: {name!r} has dtype {tensor.dtype}, not one of {sorted(map(str, _ST_DTYPES))}")
        return cls(name, tuple(tensor.shape), _ST_DTYPES[tensor.dtype])


_ITEM_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """The tensors of one bucket (whole layers, in manifest order) and their byte offsets in its buffer."""

    index: int
    groups: tuple[str, ...]
    entries: tuple[ManifestEntry, ...]
    offsets: tuple[int, ...]
    nbytes: int

    def manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(entry.name, entry.shape) for entry in self.entries]


class WeightSender(Protocol):
    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        """Announce this stage's manifest before any gather; the receiver's refusal message, or None."""

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        """A flat uint8 tensor of ``layout.nbytes`` for the packer to fill (on the model's device)."""

    def send(self, layout: BucketLayout) -> None:
        """Ship the buffer filled since the last ``buffer`` call."""

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    def manifest(self) -> list[ManifestEntry]: ...

    def answer(self, refusal: str | None) -> None: ...

    def buckets(self) -> Iterator[tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]]]: ...


# ------------------------------------------------------------------ safetensors frames (no pickle)


def _header(layout: BucketLayout) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"bucket": str(layout.index)}}
    for entry, offset in zip(layout.entries, layout.offsets, strict=True):
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it


class SafetensorsBuckets:
    """Allocates each bucket as a safetensors frame whose data section the packer fills in place."""

    def __init__(self) -> None:
        self._blob: bytearray | None = None

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        header = _header(layout)
        start = 8 + len(header)
        blob = bytearray(start + layout.nbytes)
        blob[:start] = struct.pack("<Q", len(header)) + header
        self._blob = blob
        return torch.frombuffer(blob, dtype=torch.uint8, offset=start, count=layout.nbytes)

    def take(self) -> bytearray:
        """The filled frame (valid safetensors bytes); the codec forgets it."""
        if self._blob is None:
            raise RuntimeError("SafetensorsBuckets.take() without a filled buffer")
        blob, self._blob = self._blob, None
        return blob


_TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}


def decode_bucket(blob: Any, *, copy: bool = False) -> tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]]:
    """(bucket manifest, (name, tensor) pairs) of a safetensors frame (any buffer: bytes, bytearray,
    memoryview), in the sender's order. The tensors are views into ``blob`` (kept alive by them) unless
    ``copy`` — needed when the buffer is unmapped afterwards (shared memory). Any safetensors reader
    (``safetensors.torch.load``) reads the same frames; this one avoids its two extra copies."""
    view = memoryview(blob)
    (length,) = struct.unpack("<Q", view[:8])
    header = json.loads(bytes(view[8 : 8 + length]))
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda name: header[name]["data_offsets"][0])
    start, end = 8 + length, 0
    entries, tensors = [], []
    for name in order:
        info = header[name]
        entry = ManifestEntry(name, tuple(info["shape"]), info["dtype"])
        begin, stop = info["data_offsets"]
        if begin != end or stop - begin != entry.nbytes or start + stop > len(view):
            raise ValueError(f"refit: bucket frame is corrupt at {name!r} (offsets {info['data_offsets']})")
        end = stop
        flat = torch.frombuffer(blob, dtype=torch.uint8, offset=start + begin, count=entry.nbytes) if entry.nbytes else torch.empty(0, dtype=torch.uint8)
        tensor = flat.view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
        entries.append(entry)
        tensors.append((name, tensor.clone() if copy else tensor))
    return entries, tensors


# ------------------------------------------------------------------ over a multiprocessing Connection


def _send_json(conn: Any, kind: str, **payload: Any) -> None:
    conn.send_bytes(json.dumps({"kind": kind, **payload}).encode())


def _recv_json(conn: Any, *expected: str) -> dict:
    message = json.loads(conn.recv_bytes())
    if message["kind"] not in expected:
        raise RuntimeError(f"refit transport: expected {expected}, got {message['kind']!r}")
    return message


class PipeSender:
    """The sending end on a ``multiprocessing`` ``Connection`` (duplex: the receiver answers the offer)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._frames = SafetensorsBuckets()

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        _send_json(self.conn, "manifest", entries=[entry.to_json() for entry in manifest])
        return _recv_json(self.conn, "answer")["refusal"]

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        return self._frames.buffer(layout)

    def send(self, layout: BucketLayout) -> None:
        frame = self._frames.take()
        _send_json(self.conn, "bucket", index=layout.index, size=len(frame))
        self.conn.send_bytes(frame)

    def close(self) -> None:
        _send_json(self.conn, "end")


class PipeReceiver:
    """The receiving end for one pipeline stage's sender. ``timeout_s``: longest wait for any message
    (TimeoutError) — a sender that died would otherwise hang the engine."""

    def __init__(self, conn: Any, *, timeout_s: float | None = None) -> None:
        self.conn = conn
        self.timeout_s = timeout_s

    def _wait(self) -> None:
        if self.timeout_s is not None and not self.conn.poll(self.timeout_s):
            raise TimeoutError(f"refit: no message from the sender in {self.timeout_s} s")

    def manifest(self) -> list[ManifestEntry]:
        self._wait()
        return [ManifestEntry.from_json(item) for item in _recv_json(self.conn, "manifest")["entries"]]

    def answer(self, refusal: str | None) -> None:
        _send_json(self.conn, "answer", refusal=refusal)

    def buckets(self) -> Iterator[tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]]]:
        while True:
            self._wait()
            message = _recv_json(self.conn, "bucket", "shm", "end")
            if message["kind"] == "end":
                return
            if message["kind"] == "shm":
                yield self._from_shm(message)
                continue
            self._wait()
            frame = bytearray(message["size"])
            self.conn.recv_bytes_into(frame)  # straight into the frame: no intermediate copy
            yield decode_bucket(frame)

    def _from_shm(self, message: dict) -> tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]]:
        shm = SharedMemory(name=message["name"])
        try:
            return decode_bucket(shm.buf[: message["size"]], copy=True)
        finally:
            shm.close()
            _send_json(self.conn, "done")


class ShmSender(PipeSender):
    """Each bucket frame is written into POSIX shared memory (``/dev/shm``); the connection carries only
    its name, and the receiver copies the tensors out before acknowledging. The CPU counterpart of CUDA
    IPC: one copy on each side instead of a pipe's kernel round trip. Sequential: the sender waits for
    the acknowledgement, so one bucket exists at a time."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self._shm: SharedMemory | None = None

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        header = _header(layout)
        start = 8 + len(header)
        self._shm = SharedMemory(create=True, size=start + layout.nbytes)
        self._shm.buf[:start] = struct.pack("<Q", len(header)) + header
        return torch.frombuffer(self._shm.buf, dtype=torch.uint8, offset=start, count=layout.nbytes)

    def send(self, layout: BucketLayout) -> None:
        shm, self._shm = self._shm, None
        assert shm is not None, "send() without buffer()"
        try:
            _send_json(self.conn, "shm", index=layout.index, name=shm.name, size=shm.size)
            _recv_json(self.conn, "done")
        finally:
            shm.close()
            shm.unlink()
