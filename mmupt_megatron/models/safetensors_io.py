"""Safetensors files and buffers without copies: read tensors (or rows of them) straight into caller
tensors at the byte offsets of the headers (``HFWeights``), write headers for data streamed after them
(``safetensors_header``), and view tensors as bytes (``tensor_bytes``); ``Staging`` is a reusable buffer
for the pieces that cannot land in place."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from mmupt_megatron.models import mapping as M
from mmupt_megatron.models.hf_config import safetensors_files

ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtype -> safetensors dtype string."""
TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor (for file writes and reads): without a copy on CPU; a device tensor is
    copied to host memory first (only for writing: reads into a device tensor go through ``HFWeights._read``)."""
    assert tensor.is_contiguous(), "tensor_bytes needs a contiguous tensor"
    return memoryview(tensor.reshape(-1).view(torch.uint8).cpu().numpy())


# ------------------------------------------------------------------ reading HF safetensors


@dataclass(frozen=True, slots=True)
class _Stored:
    path: str
    raw_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the tensor's data in its file."""
    nbytes: int


class HFWeights:
    """Name-normalised access to the tensors of an HF checkpoint folder (single or sharded files).

    Reads use plain ``readinto`` at the byte offsets of the safetensors headers, straight into the caller's
    tensor (``read_rows_into``) or a new one (``get``): one copy from the page cache, no memory map whose
    touched pages would pile up in this process's RSS."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where: dict[str, _Stored] = {}
        self._handles: dict[str, object] = {}
        for path in safetensors_files(folder):
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for raw, info in header.items():
                if raw == "__metadata__":
                    continue
                if info["dtype"] not in TORCH_DTYPES:
                    raise ValueError(f"{path}: tensor {raw!r} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                self._where[M.normalize_hf_name(raw)] = _Stored(
                    str(path), raw, TORCH_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)

    def names(self) -> list[str]:
        return list(self._where)

    def _locate(self, name: str) -> _Stored:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} not found in the safetensors of {self.folder}")
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._locate(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._locate(name).dtype

    def num_rows(self, name: str) -> int:
        return self.shape(name)[0]

    def _read(self, stored: _Stored, offset: int, out: torch.Tensor) -> None:
        if out.device.type != "cpu":  # a device tensor: read into host memory, then one copy up
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=out.device.type == "cuda")
            self._read(stored, offset, host)
            out.copy_(host)
            return
        handle = self._handles.get(stored.path)
        if handle is None:
            handle = self._handles[stored.path] = open(stored.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        view = tensor_bytes(out)
        done = 0
        while done < len(view):
            handle.seek(stored.offset + offset + done)
            got = handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{stored.path}: tensor {stored.raw_name!r} is truncated")
            done += got

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows [start, start + len(out)) of tensor ``name`` into the contiguous ``out`` (same dtype and
        trailing shape; a 1-D tensor's rows are its elements)."""
        stored = self._locate(name)
        assert out.is_contiguous() and out.dtype == stored.dtype, (name, out.dtype, stored.dtype)
        assert tuple(out.shape[1:]) == stored.shape[1:] and start + out.shape[0] <= stored.shape[0], (name, out.shape)
        row_bytes = stored.nbytes // max(stored.shape[0], 1) if stored.shape else stored.nbytes
        if out.numel():
            self._read(stored, start * row_bytes, out)

    def get(self, name: str) -> torch.Tensor:
        stored = self._locate(name)
        out = torch.empty(stored.shape, dtype=stored.dtype)
        if out.numel():
            self._read(stored, 0, out)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor; rows past its end come back as zeros (vocab padding)."""
        stored = self._locate(name)
        out = torch.zeros(stop - start, *stored.shape[1:], dtype=stored.dtype)
        real = max(0, min(stop, stored.shape[0]) - start)
        self.read_rows_into(name, start, out[:real])
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Staging:
    """One reusable byte buffer, handed out as aligned typed tensors; ``reset`` before each unit of work.
    It grows when asked for more (views handed out earlier keep the old buffer alive until dropped)."""

    def __init__(self, nbytes: int = 0, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * dtype.itemsize
        start = -(-self._used // 64) * 64
        if start + nbytes > self._buffer.numel():
            self._buffer = torch.empty(max(start + nbytes, 2 * self._buffer.numel()), dtype=torch.uint8, device=self.device)
            start = 0
        self._used = start + nbytes
        return self._buffer[start : start + nbytes].view(dtype).reshape(tuple(shape))


def safetensors_header(tensors: Sequence[tuple[str, Sequence[int], torch.dtype]], *,
                       metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
    """(the bytes before the data section — length prefix and JSON header padded to 8 bytes —, each
    tensor's offset in the data section) of a safetensors file holding ``tensors`` in this order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, cursor = [], 0
    for name, shape, dtype in tensors:
        numel = 1
        for size in shape:
            numel *= size
        offsets.append(cursor)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + numel * dtype.itemsize]}
        cursor += numel * dtype.itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
