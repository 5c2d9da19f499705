"""Bad rows are found when the dataset is built (not mid-run), named by file and row, and skipped for the right
reason with ``on_bad_row=skip``: extreme aspect ratios, non-UTF-8 text, questions stored as bytes,
decompression bombs."""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmupt_megatron.data.dataset import DatasetConfig, ImageQuestionDataset


def _png(width: int = 28, height: int = 28, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (what a decompression bomb looks like to PIL)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _good(i: int) -> dict:
    return {"problem": f"Question {i}?", "images": [{"bytes": _png(seed=i), "path": None}]}


def _skipping(path, **kwargs) -> ImageQuestionDataset:
    return ImageQuestionDataset(path, cfg=DatasetConfig(on_bad_row="skip", **kwargs))


def test_extreme_aspect_ratio_is_a_bad_row_at_load(tmp_path):
    """Qwen's resize refuses > 200:1; that used to surface only when the trainer fitted the image."""
    rows = [_good(0), {"problem": "Thin?", "images": [{"bytes": _png(width=402, height=2), "path": None}]}, _good(1)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet row 1: aspect ratio of a 402x2 image exceeds 200"):
        ImageQuestionDataset(tmp_path / "d.parquet")
    data = _skipping(tmp_path / "d.parquet")
    assert [s.question for s in data.samples] == ["Question 0?", "Question 1?"]
    assert data.skipped.counts == {"extreme aspect ratio": 1}


def test_non_utf8_jsonl_line_names_file_and_row_and_is_skippable(tmp_path):
    from base64 import b64encode

    good = json.dumps({"problem": "Q?", "images": {"bytes": b64encode(_png()).decode()}}).encode()
    bad = b'{"problem": "caf\xe9?", "images": "x.png"}'  # Latin-1, not UTF-8
    (tmp_path / "r.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(ValueError, match=r"r\.jsonl row 1: not UTF-8 text"):
        ImageQuestionDataset(tmp_path / "r.jsonl")
    data = _skipping(tmp_path / "r.jsonl")
    assert len(data) == 2 and [s.origin.rsplit(" ", 1)[-1] for s in data.samples] == ["0", "2"]
    assert data.skipped.counts == {"unparseable row": 1}


def test_non_utf8_json_array_names_file_and_line(tmp_path):
    (tmp_path / "r.json").write_bytes(b'[\n{"problem": "ok?", "images": "a.png"},\n{"problem": "\xff", "images": "a.png"}\n]')
    with pytest.raises(ValueError, match=r"r\.json line 3: not UTF-8 text"):
        ImageQuestionDataset(tmp_path / "r.json")


def test_question_stored_as_bytes_is_not_an_empty_question(tmp_path):
    schema = pa.schema([("problem", pa.binary()), ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    rows = [{"problem": b"Question?", "images": [{"bytes": _png(), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows + rows, schema=schema), tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{**_good(0), "problem": "Fine?"}]), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet row 0: the question \('problem'\) is 9 bytes, not text"):
        ImageQuestionDataset(tmp_path / "b.parquet")
    data = _skipping([tmp_path / "b.parquet", tmp_path / "c.parquet"])
    assert len(data) == 1 and data.skipped.counts == {"question not text": 2}


@pytest.mark.parametrize("width, height, cap", [(20_000, 20_000, 64_000_000), (10_000, 10_000, 200_000_000)])
def test_decompression_bomb_is_counted_as_over_the_pixel_cap(tmp_path, width, height, cap):
    """PIL's own guard (an error over ~179 M pixels, a warning over ~89 M) is the same reason as our cap."""
    rows = [_good(0), {"problem": "Bomb?", "images": [{"bytes": _png_header_only(width, height), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet row 1: .*decompression-bomb guard"):
        ImageQuestionDataset(tmp_path / "d.parquet", cfg=DatasetConfig(max_decode_pixels=cap))
    data = _skipping(tmp_path / "d.parquet", max_decode_pixels=cap)
    assert len(data) == 1 and data.skipped.counts == {"image over pixel cap": 1}
