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
CUDA IPC). Both reuse their buffers from bucket to bucket and refit to refit (fresh memory costs page
faults that take longer than the copy itself); a receiver with ``reuse_buffers`` hands the engine views
of the segment itself, so a bucket is copied once on each side — into the frame, into the engine. The
same frames can ride the Ray object store (``SafetensorsBuckets.take`` on the sender, ``decode_bucket``
on the engine actor). Control messages (manifest, answer, done, end) are JSON.

Pipes rather than ``multiprocessing.Queue``: a queue pickles every message into a second copy before
writing it. Frames travel as raw bytes on the connection's socket after a JSON message with their size,
read straight into the receive buffer (``Connection.recv_bytes_into`` would read into a BytesIO and copy).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Protocol

import torch

from mmupt_megatron.models.safetensors_io import ST_DTYPES as _ST_DTYPES
from mmupt_megatron.models.safetensors_io import TORCH_DTYPES as _TORCH_DTYPES


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


_ITEM_SIZE = {name: dtype.itemsize for name, dtype in _TORCH_DTYPES.items()}


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

    # Optional: ``share() -> (name, offset) | None`` — a host shared-memory name under which the TP peers of
    # the sender can map the buffer ``buffer`` just handed out (``ShmSender``). ``weight_sync`` then lets
    # every TP rank write its own pieces into it instead of gathering them over the process group.


class FanoutSender:
    """One stream into several senders, one per transport a sender needs (``refit_routes.refit_transports``: its
    host's engines by shared memory, another host's by broadcast). The packer fills the first sender's buffer (its
    ``share``, if any, lets the TP peers write their pieces in place); each bucket is then copied into the other
    senders' buffers, and every sender ships it."""

    def __init__(self, senders: Sequence[Any]) -> None:
        if not senders:
            raise ValueError("FanoutSender: needs at least one sender")
        self.senders = list(senders)
        self._data: torch.Tensor | None = None

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        refusals = [sender.offer(manifest) for sender in self.senders]  # every receiver sees the manifest
        return next((r for r in refusals if r), None)

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        self._data = self.senders[0].buffer(layout)
        return self._data

    def share(self) -> tuple[str, int] | None:
        share = getattr(self.senders[0], "share", None)
        return share() if share is not None else None

    def send(self, layout: BucketLayout) -> None:
        data, self._data = self._data, None
        if data is None:
            raise RuntimeError("FanoutSender.send: no buffer was handed out for this bucket")
        for other in self.senders[1:]:
            other.buffer(layout).copy_(data)
        del data  # the first transport may unmap its buffer once sent
        for sender in self.senders:
            sender.send(layout)

    def close(self) -> None:
        for sender in self.senders:
            sender.close()

    @property
    def segments(self) -> list[str]:
        return [name for sender in self.senders for name in getattr(sender, "segments", [])]

    def release(self) -> None:
        for sender in self.senders:
            if hasattr(sender, "release"):
                sender.release()


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


def decode_bucket(blob: Any, *, copy: bool = False) -> tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]]:
    """(bucket manifest, (name, tensor) pairs) of a safetensors frame (any buffer — bytes, bytearray,
    memoryview — or a flat uint8 tensor), in the sender's order. The tensors are views into ``blob`` (kept
    alive by them) unless ``copy`` — needed when the buffer is unmapped or reused afterwards. Any
    safetensors reader (``safetensors.torch.load``) reads the same frames; this one avoids its two extra
    copies."""
    flat = blob if isinstance(blob, torch.Tensor) else None
    view = memoryview(flat[:8].cpu().numpy()) if flat is not None else memoryview(blob)  # a GPU frame: header to host
    (length,) = struct.unpack("<Q", view[:8])
    raw = bytes(flat[8 : 8 + length].cpu().numpy()) if flat is not None else bytes(view[8 : 8 + length])
    header = json.loads(raw)
    header.pop("__metadata__", None)
    total = flat.numel() if flat is not None else len(view)
    if flat is None:
        flat = torch.frombuffer(blob, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
    order = sorted(header, key=lambda name: header[name]["data_offsets"][0])
    start, end = 8 + length, 0
    entries, tensors = [], []
    for name in order:
        info = header[name]
        entry = ManifestEntry(name, tuple(info["shape"]), info["dtype"])
        begin, stop = info["data_offsets"]
        if begin != end or stop - begin != entry.nbytes or start + stop > total:
            raise ValueError(f"refit: bucket frame is corrupt at {name!r} (offsets {info['data_offsets']})")
        end = stop
        data = flat[start + begin : start + stop]
        dtype = _TORCH_DTYPES[entry.dtype]
        if copy or (start + begin) % dtype.itemsize:  # an unaligned tensor cannot be a typed view
            tensor = data.clone().view(dtype).reshape(entry.shape)
        else:
            tensor = data.view(dtype).reshape(entry.shape)
        entries.append(entry)
        tensors.append((name, tensor))
    return entries, tensors


# ------------------------------------------------------------------ over a multiprocessing Connection


def _write_all(conn: Any, data: memoryview) -> None:
    """Raw bytes on the connection's socket, after a JSON message announcing their size: no framing copy
    (``Connection.send_bytes`` writes from the buffer too, but ``recv_bytes_into`` reads the whole message
    into a BytesIO first and copies it out again — about 5x slower here)."""
    fd, done = conn.fileno(), 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _read_into(conn: Any, data: memoryview) -> None:
    fd, done = conn.fileno(), 0
    while done < len(data):
        got = os.readv(fd, [data[done:]])
        if not got:
            raise EOFError("refit: the sender closed the connection inside a bucket")
        done += got


def _send_json(conn: Any, kind: str, **payload: Any) -> None:
    conn.send_bytes(json.dumps({"kind": kind, **payload}).encode())


def _recv_json(conn: Any, *expected: str) -> dict:
    message = json.loads(conn.recv_bytes())
    if message["kind"] not in expected:
        raise RuntimeError(f"refit transport: expected {expected}, got {message['kind']!r}")
    return message


def _frame_prefix(layout: BucketLayout) -> bytes:
    header = _header(layout)
    return struct.pack("<Q", len(header)) + header


class PipeSender:
    """The sending end on a ``multiprocessing`` ``Connection`` (duplex: the receiver answers the offer).
    One frame buffer, grown to the largest bucket and reused for every bucket (and refit) it sends."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._frame = bytearray()
        self._size = 0

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        _send_json(self.conn, "manifest", entries=[entry.to_json() for entry in manifest])
        return _recv_json(self.conn, "answer")["refusal"]

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        prefix = _frame_prefix(layout)
        self._size = len(prefix) + layout.nbytes
        if len(self._frame) < self._size:
            self._frame = bytearray(self._size)  # grown once per larger bucket; then reused
        self._frame[: len(prefix)] = prefix
        return torch.frombuffer(self._frame, dtype=torch.uint8, offset=len(prefix), count=layout.nbytes)

    def send(self, layout: BucketLayout) -> None:
        _send_json(self.conn, "bucket", index=layout.index, size=self._size)
        _write_all(self.conn, memoryview(self._frame)[: self._size])  # once written, the buffer is reusable

    def close(self) -> None:
        _send_json(self.conn, "end")


class PipeReceiver:
    """The receiving end for one pipeline stage's sender. ``timeout_s``: longest wait for any message
    (TimeoutError) — a sender that died would otherwise hang the engine.

    ``reuse_buffers``: a bucket's tensors are views of a buffer that the next bucket overwrites (the
    shared-memory segment itself, or one receive buffer) — no copy and no new memory per bucket, but
    they are only valid until the next bucket is requested (clone to keep; ``load_refit`` and the engines
    copy them into their parameters). Otherwise each bucket's tensors are its own (a fresh receive
    buffer, or a copy out of shared memory)."""

    def __init__(self, conn: Any, *, timeout_s: float | None = None, reuse_buffers: bool = False) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.reuse_buffers = reuse_buffers
        self._frame = torch.empty(0, dtype=torch.uint8)
        self._mapped: dict[str, torch.Tensor] = {}

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
                bucket, mapped = self._from_shm(message)
                if not mapped:
                    _send_json(self.conn, "done")  # copied out: the sender may reuse the segment now
                yield bucket
                if mapped:
                    _send_json(self.conn, "done")  # the consumer is done with the views
                continue
            self._wait()
            if not self.reuse_buffers:
                frame = bytearray(message["size"])
                _read_into(self.conn, memoryview(frame))  # straight into the frame: no intermediate copy
                yield decode_bucket(frame)
                continue
            if self._frame.numel() < message["size"]:
                self._frame = torch.empty(message["size"], dtype=torch.uint8)
            _read_into(self.conn, memoryview(self._frame.numpy())[: message["size"]])
            yield decode_bucket(self._frame[: message["size"]])

    def _from_shm(self, message: dict) -> tuple[tuple[list[ManifestEntry], list[tuple[str, torch.Tensor]]], bool]:
        """(the bucket, whether its tensors are views of the segment)."""
        name, size = message["name"], message["size"]
        path = f"/dev/shm/{name}"
        if not self.reuse_buffers or not os.path.exists(path):  # copy out (also where /dev/shm is not the store)
            shm = SharedMemory(name=name)
            try:
                return decode_bucket(shm.buf[:size], copy=True), False
            finally:
                shm.close()
        mapped = self._mapped.get(name)
        if mapped is None or mapped.numel() < size:
            mapped = map_shared_segment(name, self._mapped)
        return decode_bucket(mapped[:size]), True


def map_shared_segment(name: str, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Map the shared-memory segment ``name`` (``/dev/shm/<name>``) as a flat uint8 tensor and keep it in
    ``cache``, dropping the mappings of segments that are gone (a sender replaced or released them: a
    mapping would keep their memory alive). The mapping is owned by its tensors: unmapped when the last
    view is gone, whatever a consumer keeps."""
    for stale in [key for key in cache if not os.path.exists(f"/dev/shm/{key}")]:
        del cache[stale]
    path = f"/dev/shm/{name}"
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=os.path.getsize(path))
    cache[name] = torch.empty(0, dtype=torch.uint8).set_(storage)
    return cache[name]


_SEGMENT_ALIGN = 1 << 20
"""Shared-memory segments are sized in multiples of this (fewer regrowths when later buckets are larger)."""

SEGMENT_PREFIX = "mmupt_"
"""Every refit segment's name starts with this (``/dev/shm/mmupt_*``): leftovers are recognisable."""


def sweep_segments(prefix: str) -> list[str]:
    """Unlink this host's shared-memory segments whose names start with ``prefix`` (what a sender that died
    before releasing them left behind); returns their names."""
    if not prefix.startswith(SEGMENT_PREFIX) or "/" in prefix or not os.path.isdir("/dev/shm"):
        return []
    removed = []
    for name in sorted(os.listdir("/dev/shm")):
        if name.startswith(prefix):
            try:
                os.unlink(f"/dev/shm/{name}")
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


class ShmBuckets:
    """Bucket frames in a ring of ``num_buffers`` POSIX shared-memory segments (``/dev/shm/<name_prefix>...``),
    each grown to the largest bucket it carries and reused for later buckets and refits (``release`` unlinks
    them; so does garbage collection). A sender fills ``fill(layout)`` (the data section; the frame's header is
    written here), then hands ``take()`` — (slot, segment name, frame size) — to whoever loads it. TP peers on
    this host map the segment ``share()`` names and write their own pieces into it (``weight_sync``)."""

    def __init__(self, *, num_buffers: int = 1, name_prefix: str = SEGMENT_PREFIX) -> None:
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        if not name_prefix.startswith(SEGMENT_PREFIX) or "/" in name_prefix:
            raise ValueError(f"segment names start with {SEGMENT_PREFIX!r} and have no '/', got {name_prefix!r}")
        self._prefix = name_prefix
        self._ring: list[SharedMemory | None] = [None] * num_buffers
        self._next = 0
        self._current: int | None = None
        self._size = 0
        self._layout_nbytes = 0
        self._finalizer = weakref.finalize(self, _unlink_all, self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def restart(self) -> None:
        """A new refit fills the slots in the same order (slot 0 took the largest bucket)."""
        self._next = 0

    def next_slot(self) -> int:
        """The slot the next ``fill`` uses (its previous bucket must be loaded by then)."""
        return self._next

    def fill(self, layout: BucketLayout) -> torch.Tensor:
        """The data section of the next slot's frame for ``layout`` (the header is written)."""
        slot = self._next
        self._next = (slot + 1) % len(self._ring)
        prefix = _frame_prefix(layout)
        size = len(prefix) + layout.nbytes
        shm = self._ring[slot]
        if shm is None or shm.size < size:
            if shm is not None:
                _unlink_all([shm])
            shm = self._ring[slot] = SharedMemory(create=True, size=-(-size // _SEGMENT_ALIGN) * _SEGMENT_ALIGN,
                                                  name=f"{self._prefix}{secrets.token_hex(6)}")
        shm.buf[: len(prefix)] = prefix
        self._current, self._size, self._layout_nbytes = slot, size, layout.nbytes
        return torch.frombuffer(shm.buf, dtype=torch.uint8, offset=len(prefix), count=layout.nbytes)

    def share(self) -> tuple[str, int] | None:
        """(segment name, offset of the data section) of the frame being filled, for TP peers on this host."""
        if self._current is None:
            return None
        return self._ring[self._current].name, self._size - self._layout_nbytes

    def take(self) -> tuple[int, str, int]:
        """(slot, segment name, frame size) of the filled frame, handed on; the next ``fill`` starts another."""
        slot, self._current = self._current, None
        if slot is None:
            raise RuntimeError("ShmBuckets.take() without fill()")
        return slot, self._ring[slot].name, self._size

    @property
    def segments(self) -> list[str]:
        """Names of the segments held (``/dev/shm/<name>`` on Linux)."""
        return [shm.name for shm in self._ring if shm is not None]

    def release(self) -> None:
        """Unlink the segments (once no refit is in flight); a later ``fill`` makes new ones."""
        self._finalizer()
        self._finalizer = weakref.finalize(self, _unlink_all, self._ring)


class ShmSender(PipeSender):
    """Each bucket frame is written into POSIX shared memory (``ShmBuckets``); the connection carries only
    its name, and the receiver acknowledges once it is done with it (after copying the tensors out, or —
    ``reuse_buffers`` — after the consumer loaded them from the segment itself). The CPU counterpart of
    CUDA IPC. With one buffer, the packer waits for the acknowledgement of bucket k before filling k + 1 (extra
    memory: one bucket); with two, it gathers bucket k + 1 while the engine loads k."""

    def __init__(self, conn: Any, *, num_buffers: int = 1, name_prefix: str = SEGMENT_PREFIX) -> None:
        super().__init__(conn)
        self.buckets = ShmBuckets(num_buffers=num_buffers, name_prefix=name_prefix)
        self._awaiting = [False] * len(self.buckets)

    def offer(self, manifest: Sequence[ManifestEntry]) -> str | None:
        self.buckets.restart()
        return super().offer(manifest)

    def share(self) -> tuple[str, int] | None:
        return self.buckets.share()

    def _settle(self, slot: int) -> None:
        if self._awaiting[slot]:
            _recv_json(self.conn, "done")
            self._awaiting[slot] = False

    def buffer(self, layout: BucketLayout) -> torch.Tensor:
        self._settle(self.buckets.next_slot())  # the receiver is done with what this segment carried last
        return self.buckets.fill(layout)

    def send(self, layout: BucketLayout) -> None:
        slot, name, size = self.buckets.take()
        _send_json(self.conn, "shm", index=layout.index, name=name, size=size)
        self._awaiting[slot] = True

    def close(self) -> None:
        """End this refit (after the receiver acknowledged every bucket); the segments stay for the next."""
        for slot in range(len(self.buckets)):
            self._settle(slot)
        _send_json(self.conn, "end")

    @property
    def segments(self) -> list[str]:
        return self.buckets.segments

    def release(self) -> None:
        self.buckets.release()


def _unlink_all(ring: list[SharedMemory | None]) -> None:
    for index, shm in enumerate(ring):
        if shm is None:
            continue
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass
        shm.unlink()
        ring[index] = None
