"""Parquet / JSONL datasets with real PNGs: formats, key names, and every bad-input path."""

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmupt_megatron.data.dataset import DatasetConfig, ImageQuestionDataset, list_data_files


def _png(seed: int = 0, size: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def _rows(n: int = 3) -> list[dict]:
    return [{"id": f"r{i}", "problem": f"Question {i}?", "images": [{"bytes": _png(i), "path": None}], "answer": str(i)}
            for i in range(n)]


def test_parquet_rows_load_with_images_and_answers(tmp_path):
    _parquet(tmp_path / "train.parquet", _rows(3))
    data = ImageQuestionDataset(tmp_path / "train.parquet")
    assert len(data) == 3 and data.skipped.total == 0
    sample, image = data[1]
    assert (sample.id, sample.question, sample.answer) == ("r1", "Question 1?", "1")
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(_png(1)))))


def test_jsonl_with_relative_paths_base64_and_single_images(tmp_path):
    sub = tmp_path / "data"
    (sub / "imgs").mkdir(parents=True)
    (sub / "imgs" / "a.png").write_bytes(_png(5))
    lines = [
        {"question": "Path as string?", "image": "imgs/a.png", "label": 3},
        {"question": "Dict with path?", "image": [{"path": "imgs/a.png"}]},
        {"question": "Base64 bytes?", "image": {"bytes": base64.b64encode(_png(6)).decode()}},
        {},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n"
    (sub / "rows.jsonl").write_text(text)
    cfg = DatasetConfig(problem_key="question", image_key="image", answer_key="label")
    data = ImageQuestionDataset(sub / "rows.jsonl", cfg=cfg)
    assert [s.answer for s in data.samples] == ["3", None, None]
    assert [s.id for s in data.samples] == ["rows:0", "rows:1", "rows:2"]
    assert data[0][1].size == (28, 28) and data[2][1].size == (28, 28)


def test_folder_and_list_of_files(tmp_path):
    _parquet(tmp_path / "a.parquet", _rows(2))
    _parquet(tmp_path / "b.parquet", _rows(3))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in list_data_files(tmp_path)] == ["a.parquet", "b.parquet"]
    assert len(ImageQuestionDataset(tmp_path)) == 5
    assert len(ImageQuestionDataset([tmp_path / "a.parquet", tmp_path / "b.parquet"])) == 5


def test_empty_folder_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        ImageQuestionDataset(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown data format '.csv'"):
        ImageQuestionDataset(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not found"):
        ImageQuestionDataset(tmp_path / "nope.parquet")


def test_file_without_rows_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable rows"):
        ImageQuestionDataset(tmp_path / "empty.jsonl")


def test_missing_column_names_the_file_and_key(tmp_path):
    _parquet(tmp_path / "t.parquet", [{"problem": "Q?", "picture": _png()}])
    with pytest.raises(ValueError, match=r"t\.parquet: missing column\(s\) \['images'\]"):
        ImageQuestionDataset(tmp_path / "t.parquet")


BAD_ROWS = [
    ({"problem": "", "images": [{"bytes": _png(), "path": None}]}, "empty question", "empty or missing question"),
    ({"problem": "Q?", "images": [{"bytes": b"garbage", "path": None}]}, "bad image", "cannot decode"),
    ({"problem": "Q?", "images": [{"bytes": None, "path": "gone.png"}]}, "missing image", "not found"),
    ({"problem": "Q?", "images": [{"bytes": _png(size=64), "path": None}]}, "image over pixel cap", "hard cap"),
    ({"problem": "Q?", "images": []}, "bad image", "exactly one image"),
    ({"problem": "Q?", "images": [{"bytes": None, "path": None}]}, "bad image", "neither"),
]


@pytest.mark.parametrize("bad, reason, message", BAD_ROWS)
def test_bad_row_errors_name_file_and_row(tmp_path, bad, reason, message):
    rows = _rows(2) + [bad]
    _parquet(tmp_path / "d.parquet", rows)
    cfg = DatasetConfig(max_decode_pixels=40 * 40)
    with pytest.raises(ValueError, match=rf"d\.parquet row 2: .*{message}"):
        ImageQuestionDataset(tmp_path / "d.parquet", cfg=cfg)
    skipping = ImageQuestionDataset(tmp_path / "d.parquet", cfg=DatasetConfig(max_decode_pixels=40 * 40, on_bad_row="skip"))
    assert len(skipping) == 2
    assert skipping.skipped.counts == {reason: 1}
    assert "row 2" in skipping.skipped.summary()


def test_invalid_json_line_is_a_bad_row(tmp_path):
    good = json.dumps({"problem": "Q?", "images": {"bytes": base64.b64encode(_png()).decode()}})
    (tmp_path / "r.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl row 1: invalid JSON"):
        ImageQuestionDataset(tmp_path / "r.jsonl")
    data = ImageQuestionDataset(tmp_path / "r.jsonl", cfg=DatasetConfig(on_bad_row="skip"))
    assert len(data) == 2 and data.skipped.total == 1


def test_all_rows_bad_in_skip_mode_still_errors(tmp_path):
    _parquet(tmp_path / "d.parquet", [{"problem": "", "images": [{"bytes": _png(), "path": None}]}])
    with pytest.raises(ValueError, match="no usable rows.*1 empty question"):
        ImageQuestionDataset(tmp_path / "d.parquet", cfg=DatasetConfig(on_bad_row="skip"))


def test_config_validation():
    with pytest.raises(ValueError, match="on_bad_row"):
        DatasetConfig(on_bad_row="ignore")


def test_image_deleted_after_validation_names_the_row(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "r.jsonl").write_text(json.dumps({"problem": "Q?", "images": "a.png"}) + "\n")
    data = ImageQuestionDataset(tmp_path / "r.jsonl")
    (tmp_path / "a.png").unlink()
    with pytest.raises(ValueError, match=r"r\.jsonl row 0: image file not found"):
        data[0]
