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
    rows = [{**row, "decoded_image": {"bytes": png_bytes(int(pid)), "path": row["image"]}}
            for pid, row in mathvista_rows().items()]
    return _parquet(folder / "testmini.parquet", rows)


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WEMATH_CONCEPT = {"2steps_1": "Circumference of Circles", "3steps_1": "Left-Right Position"}


def wemath_rows() -> list[dict]:
    """testmini.json as We-Math publishes it: a problem's ``ID`` is shared by its one-step sub-problems
    (``key`` 2steps_1, 2steps_2) and the multi-step problem (2steps_multi); option strings as published,
    with a missing separator, a skipped letter, and option texts that are themselves letters."""

    def row(qid, key, number, question, option, answer, image):
        return {"ID": qid, "split": "testmini", "knowledge concept": WEMATH_CONCEPT[qid], "question": question,
                "option": option, "answer": answer, "image_path": image, "key": key, "question number": number,
                "knowledge concept description": f"{WEMATH_CONCEPT[qid]}:\n1. A definition."}

    return [
        row("2steps_1", "2steps_1", 1, "If the circumference is 6.28 cm, the radius is ( ) cm.",
            "A. 1 cm;B. 1.5 cm;C. 3.14 cm;D. 6.28 cm; E. No correct answer", "A", "2steps/image/1-1.png"),
        row("2steps_1", "2steps_2", 2, "The angle at the centre is ( ).",
            "A. 45° B. 60° ;C. 120°", "B", "2steps/image/1-2.png"),
        row("2steps_1", "2steps_multi", 3, "What is the length of the arc (  ) cm?",
            "A. 3.14;B. 6.28;C. 12.56;D. 1; F. No correct answer", "F", "2steps/image/1-multi.png"),
        row("3steps_1", "3steps_1", 4, "As shown in the diagram, the block to the right of H is ( ).",
            "A. F;    B. D;    C. B;    D. I; E. No correct answer", "D", "3steps/image/1-1.png"),
        row("3steps_1", "3steps_2", 5, "Mike stands at point A and moves to the right to reach which point?",
            "A. B; B. C; C. D; D. E; E. No correct answer", "C", "3steps/image/1-2.png"),
        row("3steps_1", "3steps_3", 6, "B is on the ( ) side of A.", "A. Left; B. Right; C. Cannot be determined.; "
            "D. No correct answer", "B", "3steps/image/1-3.png"),
        row("3steps_1", "3steps_multi", 7, "Which block is two to the right of H?",
            "A. A; B. B; C. C; D. E; E. No correct answer", "B", "3steps/image/1-multi.png"),
    ]


def write_wemath(folder: Path, rows: list[dict] | None = None) -> Path:
    """The repository layout: data/testmini.json with data/2steps/image/1-1.png ..."""
    rows = wemath_rows() if rows is None else rows
    for i, row in enumerate(rows):
        if isinstance(row.get("image_path"), str) and row["image_path"]:
            write_png(folder / "data" / row["image_path"], i + 5)
    path = folder / "data" / "testmini.json"
    path.write_text(json.dumps(rows, indent=4, ensure_ascii=True))
    return path


def write_wemath_parquet(folder: Path) -> Path:
    """The Hugging Face copy: testmini.parquet with the images embedded in ``image_path``."""
    rows = [{**row, "image_path": {"bytes": png_bytes(i + 5), "path": Path(row["image_path"]).name}}
            for i, row in enumerate(wemath_rows())]
    return _parquet(folder / "testmini.parquet", rows)


def mathverse_rows() -> list[dict]:
    """testmini.json: "Choices:" and "Choice:" headers, a Vision Only row (empty question: choices in the
    image), two right answers ("C\nD"), a free-form row, an answer given as the option's text."""
    meta = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}

    def row(index, problem, version, question, image, answer, kind, **extra):
        return {"sample_index": str(index), "problem_index": str(problem), "problem_version": version,
                "question": question, "image": image, "answer": answer, "question_type": kind,
                "metadata": {**meta, **extra}, "query_wo": "Please answer ...", "query_cot": "Please first ...",
                "question_for_eval": question}

    return [
        row(1, 1, "Text Dominant", "As shown in the figure, angle AOB is 80°, what is angle BOC?\nChoices:\nA:40°\n"
            "B:50°\nC:60°\nD:80°", "images_version_1-4/image_1.png", "B", "multi-choice"),
        row(2, 1, "Vision Only", "", "images_version_5/image_1.png", "B", "multi-choice"),
        row(3, 2, "Text Lite", "Find the length of AB.", "images_version_1-4/image_2.png", "12", "free-form",
            subfield="Length"),
        row(4, 3, "Vision Intensive", "Is the line tangent?\nChoice:\nA:True\nB:False",
            "images_version_1-4/image_3.png", "False", "multi-choice"),
        row(5, 4, "Vision Dominant", "Which angles are right angles?\nChoices:\nA:∠1\nB:∠2\nC:∠3\nD:∠4",
            "images_version_1-4/image_4.png", "C\nD", "multi-choice", subject="Solid Geometry"),
    ]


def write_mathverse(folder: Path, rows: list[dict] | None = None, *, images: Path | None = None) -> Path:
    """testmini.json with the image folders next to it (or under ``images``)."""
    rows = mathverse_rows() if rows is None else rows
    for i, row in enumerate(rows):
        if row.get("image"):
            write_png((images or folder) / row["image"], i + 9)
    path = folder / "testmini.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return path


def mathverse_text_only_rows() -> list[dict]:
    """testmini_text_only.json: the Text Only version, no image."""
    return [{"sample_index": "6", "problem_index": "1", "problem_version": "Text Only",
             "question": "In circle O, angle AOB is 80° and OC bisects it. What is angle BOC?\nChoices:\nA:40°\n"
                         "B:50°\nC:60°\nD:80°", "image": "", "answer": "A", "question_type": "multi-choice",
             "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"},
             "query_wo": "...", "query_cot": "...", "question_for_eval": "..."},
            {"sample_index": "7", "problem_index": "2", "problem_version": "Text Only",
             "question": "A segment AB of length 12 is ... Find the length of AB.", "image": "", "answer": "12",
             "question_type": "free-form",
             "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Length"},
             "query_wo": "...", "query_cot": "...", "question_for_eval": "..."}]


def write_mathverse_text_only(folder: Path) -> Path:
    path = folder / "testmini_text_only.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mathverse_text_only_rows(), indent=1, ensure_ascii=False))
    return path


def write_mathverse_parquet(folder: Path) -> tuple[Path, Path]:
    """The Hugging Face copies: testmini (images embedded) and testmini_text_only (no image column)."""
    rows = [{**row, "image": {"bytes": png_bytes(i + 9), "path": row["image"]}} for i, row in enumerate(mathverse_rows())]
    text_only = [{k: v for k, v in row.items() if k != "image"} for row in mathverse_text_only_rows()]
    return (_parquet(folder / "testmini" / "testmini-00000-of-00001.parquet", rows),
            _parquet(folder / "testmini_text_only" / "testmini_text_only-00000-of-00001.parquet", text_only))


def mathvision_rows() -> list[dict]:
    """data/test.jsonl rows: options as a list, a question that is only ``<image1>``, a letter answer with
    no options (drawn in the image), a free-form answer whose LaTeX escape is broken in the file."""
    return [
        {"id": "1", "question": "Which number is in the middle?\n<image1>", "options": ["1", "2", "3", "4", "5"],
         "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2, "subject": "arithmetic"},
        {"id": "2", "question": "<image1> How many dots are hidden?", "options": [], "image": "images/2.jpg",
         "answer": "7", "solution": None, "level": 3, "subject": "counting"},
        {"id": "3", "question": "<image1>", "options": [], "image": "images/3.jpg", "answer": "B", "solution": None,
         "level": 1, "subject": "counting"},
        # "\frac{1}{2}" written with one backslash: JSON reads a form feed + "rac{1}{2}"
        {"id": "4", "question": "What fraction of the square is shaded?\n<image1>", "options": [],
         "image": "images/4.jpg", "answer": "\x0crac{1}{2}", "solution": None, "level": 4, "subject": "metric geometry"},
    ]


def write_mathvision(folder: Path, rows: list[dict] | None = None) -> Path:
    """The repository layout: data/test.jsonl, images/ at the repository root."""
    rows = mathvision_rows() if rows is None else rows
    for i, row in enumerate(rows):
        if isinstance(row.get("image"), str) and row["image"]:
            write_png(folder / row["image"], i + 13)
    path = folder / "data" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_mathvision_parquet(folder: Path) -> Path:
    """The Hugging Face copy: ``image`` stays a path string, the pixels are in ``decoded_image``."""
    rows = [{**row, "decoded_image": {"bytes": png_bytes(i + 13), "path": row["image"]}}
            for i, row in enumerate(mathvision_rows())]
    return _parquet(folder / "data" / "testmini-00000-of-00001.parquet", rows)


def write_generic(folder: Path) -> Path:
    rows = [{"problem": "How many circles?", "images": "img/a.png", "answer": "3", "id": "g1"},
            {"problem": "How many squares?", "images": ["img/b.png"], "answer": "4", "id": "g2"}]
    for i, name in enumerate(("img/a.png", "img/b.png")):
        write_png(folder / name, i + 20)
    path = folder / "holdout.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
