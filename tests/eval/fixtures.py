"""Small benchmark files in each published format, with real PNGs, written by the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, ((40 * seed) % 256, (90 + 17 * seed) % 256, (200 - 23 * seed) % 256))


def png_bytes(seed: int, size: tuple[int, int] = (60, 40)) -> bytes:
    buffer = io.BytesIO()
    _image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, seed: int, size: tuple[int, int] = (60, 40)) -> Path:
    """A real image file (PNG, or JPEG for a .jpg name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed, size).save(path)
    return path


def mathvista_rows() -> dict[str, dict]:
    """testmini.json: an object keyed by pid; multiple choice gives the choice's text as the answer."""
    meta = {"split": "testmini", "source": "FigureQA", "task": "figure question answering", "skills": ["statistical reasoning"]}
    return {
        "1": {"pid": "1", "question": "Is the bar taller than the line?", "image": "images/1.png",
              "choices": ["yes", "no"], "unit": None, "precision": None, "answer": "no",
              "question_type": "multi_choice", "answer_type": "text", "metadata": meta},
        "2": {"pid": "2", "question": "What is the length of the rod?", "image": "images/2.png", "choices": None,
              "unit": "cm", "precision": 1.0, "answer": "1.5", "question_type": "free_form", "answer_type": "float",
              "metadata": {**meta, "task": "geometry problem solving"}},
        "3": {"pid": "3", "question": "How many squares are there?", "image": "images/3.png", "choices": None,
              "unit": None, "precision": None, "answer": "2", "question_type": "free_form", "answer_type": "integer",
              "metadata": {**meta, "task": "geometry problem solving"}},
        "4": {"pid": "4", "question": "Which angle is the largest?", "image": "images/4.png",
              "choices": ["30", "60", "90"], "unit": None, "precision": None, "answer": "90",
              "question_type": "multi_choice", "answer_type": "integer", "metadata": meta},
    }


def write_mathvista(folder: Path, rows: dict[str, dict] | None = None, *, images: bool = True) -> Path:
    rows = mathvista_rows() if rows is None else rows
    if images:
        for pid, row in rows.items():
            write_png(folder / row["image"], int(pid))
    path = folder / "testmini.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_mathvista_parquet(folder: Path) -> Path:
    """The Hugging Face copy: a parquet table with the images embedded in ``decoded_image``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for pid, row in mathvista_rows().items():
        rows.append({**row, "decoded_image": {"bytes": png_bytes(int(pid)), "path": row["image"]}})
    table = pa.Table.from_pylist(rows)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "testmini.parquet")
    return folder / "testmini.parquet"


def wemath_rows() -> list[dict]:
    return [
        {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Area of Circles",
         "question": "What is the area of the circle (  ) cm²?", "option": "A. 3.14;B. 6.28;C. 12.56;D. 1; E. No correct answer",
         "answer": "C", "image_path": "2steps/image/1.png", "key": "2steps_2", "question number": 1},
        {"ID": "1step_7", "split": "testmini", "knowledge concept": "Counting",
         "question": "How many triangles?", "option": "A. 2;B. 3", "answer": "A", "image_path": "1step/image/7.png",
         "key": "1step_1", "question number": 2},
    ]


def write_wemath(folder: Path, rows: list[dict] | None = None) -> Path:
    rows = wemath_rows() if rows is None else rows
    for i, row in enumerate(rows):
        if "image_path" in row:
            write_png(folder / row["image_path"], i + 5)
    path = folder / "testmini.json"
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return path


def mathverse_rows() -> list[dict]:
    meta = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    return [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "As shown in the figure, angle AOB is 80°, what is angle BOC?\nChoices:\nA:40°\nB:50°\nC:60°\nD:80°",
         "image": "images_version_1-4/image_1.png", "answer": "B", "question_type": "multi-choice", "metadata": meta,
         "query_wo": "...", "query_cot": "..."},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "question": "",
         "image": "images_version_5/image_1.png", "answer": "B", "question_type": "multi-choice", "metadata": meta,
         "query_wo": "...", "query_cot": "..."},
        {"sample_index": "3", "problem_index": "2", "problem_version": "Text Lite",
         "question": "Find the length of AB.", "image": "images_version_1-4/image_2.png", "answer": "12",
         "question_type": "free-form", "metadata": {**meta, "subfield": "Length"}, "query_wo": "...", "query_cot": "..."},
        {"sample_index": "4", "problem_index": "3", "problem_version": "Text Dominant",
         "question": "Is the line tangent?\nChoices:\nA:True\nB:False", "image": "images_version_1-4/image_3.png",
         "answer": "False", "question_type": "multi-choice", "metadata": meta, "query_wo": "...", "query_cot": "..."},
    ]


def write_mathverse(folder: Path, rows: list[dict] | None = None) -> Path:
    rows = mathverse_rows() if rows is None else rows
    for i, row in enumerate(rows):
        write_png(folder / row["image"], i + 9)
    path = folder / "testmini.json"
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return path


def mathvision_rows() -> list[dict]:
    return [
        {"id": "1", "question": "Which number is in the middle?\n<image1>", "options": ["1", "2", "3", "4", "5"],
         "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2, "subject": "arithmetic"},
        {"id": "2", "question": "<image1> How many dots are hidden?", "options": [], "image": "images/2.jpg",
         "answer": "7", "solution": None, "level": 3, "subject": "counting"},
    ]


def write_mathvision(folder: Path, rows: list[dict] | None = None) -> Path:
    rows = mathvision_rows() if rows is None else rows
    for i, row in enumerate(rows):
        write_png(folder / row["image"], i + 13)
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_generic(folder: Path) -> Path:
    rows = [{"problem": "How many circles?", "images": "img/a.png", "answer": "3", "id": "g1"},
            {"problem": "How many squares?", "images": ["img/b.png"], "answer": "4", "id": "g2"}]
    for i, name in enumerate(("img/a.png", "img/b.png")):
        write_png(folder / name, i + 20)
    path = folder / "holdout.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
