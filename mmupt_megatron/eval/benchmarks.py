"""Loaders for local copies of MathVista, We-Math, MathVerse and MathVision, and our own row format.

Each reads the file format the benchmark publishes (JSON / JSONL as in its repository, or the Hugging Face
parquet copy with images embedded) into ``Question``s:

- ``mathvista`` (testmini.json, keyed by pid, or parquet): ``pid``, ``question``, ``image`` (relative path)
  and/or ``decoded_image``, ``choices`` (list, or null for free form), ``question_type``
  (multi_choice | free_form), ``answer_type`` (integer | float | text | list), ``unit``, ``precision``,
  ``answer`` (the choice's *text* for multiple choice), ``metadata`` (``task``, ``skills``, ``source``...).
  Category: ``metadata.task``. Free-form hints: the unit and the decimal places asked for.
- ``wemath`` (testmini.json): ``ID``, ``question``, ``option`` ("A. 3;B. 4;C. 5"), ``answer`` (a letter),
  ``image_path``, ``knowledge concept``, ``key``, ``split``. Category: ``knowledge concept``.
- ``mathverse`` (testmini.json or parquet): ``sample_index``, ``problem_index``, ``problem_version``,
  ``question`` (multiple choice lists "Choices:\\nA:...\\nB:..." inside it; empty for Vision Only),
  ``image``, ``answer``, ``question_type`` (multi-choice | free-form), ``metadata`` (``subject``,
  ``subfield``, ``source``). Category: ``problem_version``.
- ``mathvision`` (test.jsonl or parquet): ``id``, ``question`` (with ``<image1>`` markers, dropped here),
  ``options`` (list, empty for free form), ``image`` and/or ``decoded_image``, ``answer`` (a letter when
  there are options), ``level``, ``subject``. Category: ``subject``.
- ``generic``: the training row format (``data.problem_key`` / ``image_key`` / ``answer_key``; parquet, JSONL
  or a folder of them), read by ``mmupt_megatron.data``; one category.

Departures from the benchmarks' own scorers: answers are the last ``\\boxed{}`` and are compared with the
training equivalence (exact rationals, letters, math-verify); there is no LLM answer extractor, and
MathVista floats are not rounded to ``precision`` (the prompt asks for that many decimals instead).

Extra fields are ignored. A row missing a field its benchmark needs is an error that lists the expected and
the found fields, and names the benchmark the row looks like when it fits another one (``--benchmark``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.sources import hf_folder_kind
from mmupt_megatron.eval.generic import generic_questions
from mmupt_megatron.eval.rows import Question, Row, checked_image, choice_answer, lettered_options, read_rows


@dataclass(frozen=True)
class BenchmarkFormat:
    name: str
    required: tuple[str, ...]
    images: tuple[str, ...]
    """Image fields, in order of preference; a row needs at least one of them."""
    id_field: str
    parse: Callable[[Row, str, dict], Question] | None = None
    """(row, id, image kwargs) -> Question; None for ``generic`` (read by ``mmupt_megatron.data``)."""

    def missing(self, record: dict) -> list[str]:
        missing = [name for name in self.required if name not in record]
        if not any(name in record for name in self.images):
            missing.append(" or ".join(self.images))
        return missing


def _category(value: object) -> str:
    return str(value).strip() if value not in (None, "") and str(value).strip() else "all"


def _question(row: Row, *, drop: re.Pattern | None = None, fallback: str | None = None) -> str:
    text = row.text("question", allow_empty=fallback is not None)
    if drop is not None:
        text = re.sub(r"[ \t]{2,}", " ", drop.sub("", text)).strip()
    if not text and fallback is None:
        raise row.fail("question", "empty")
    return text or fallback  # type: ignore[return-value]


def _mathvista(row: Row, qid: str, image: dict) -> Question:
    kind = row.text("question_type")
    answer = row.text("answer")
    meta = row.record.get("metadata") or {}
    common = dict(id=qid, question=_question(row), category=_category(meta.get("task")), origin=row.origin,
                  meta={k: meta[k] for k in ("source", "skills", "grade", "context") if k in meta}, **image)
    if kind == "multi_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str | int | float) for c in choices):
            raise row.fail("choices", f"a multi_choice question needs a non-empty list of choices, got {choices!r}")
        options = tuple(str(c).strip() for c in choices)
        return Question(options=options, choice=True, answer=choice_answer(row, "answer", answer, options), **common)
    if kind != "free_form":
        raise row.fail("question_type", f"{kind!r} is neither multi_choice nor free_form")
    answer_type = row.record.get("answer_type") or "text"
    hints = []
    unit = row.record.get("unit")
    if unit not in (None, "") and str(unit).strip():
        hints.append(f"Give the number only, without the unit ({str(unit).strip()}).")
    if answer_type == "integer":
        hints.append("The answer is an integer.")
    elif answer_type == "float":
        precision = row.record.get("precision")
        if isinstance(precision, int | float) and not math.isnan(precision):
            places = int(precision)
            hints.append(f"The answer is a decimal number with {places} decimal place{'s' if places != 1 else ''}.")
    elif answer_type == "list":
        hints.append("The answer is a list, e.g. [1, 2, 3].")
    elif answer_type != "text":
        raise row.fail("answer_type", f"{answer_type!r} is not one of integer, float, text, list")
    return Question(answer=answer, hints=tuple(hints), **common)


_WEMATH_SPLIT = re.compile(r"\s*[;；]\s*(?=\(?[A-J]\)?\s*[.:：．)])")


def _wemath(row: Row, qid: str, image: dict) -> Question:
    raw = row.text("option")
    options = lettered_options(row, "option", _WEMATH_SPLIT.split(raw.rstrip(";； ")))
    answer = choice_answer(row, "answer", row.text("answer"), options)
    meta = {k: row.record[k] for k in ("key", "split", "question number") if k in row.record}
    return Question(id=qid, question=_question(row), options=options, choice=True, answer=answer,
                    category=_category(row.record.get("knowledge concept")), origin=row.origin, meta=meta, **image)


_CHOICES_HEADER = re.compile(r"\n?\s*Choices\s*:\s*\n", re.IGNORECASE)
_CHOICE_LINE = re.compile(r"^\s*\(?[A-J]\)?\s*[.:：．)]", re.MULTILINE)
_VISION_ONLY = "Answer the question shown in the image."


def _mathverse(row: Row, qid: str, image: dict) -> Question:
    kind = row.text("question_type")
    text = _question(row, fallback=_VISION_ONLY)
    meta = row.record.get("metadata") or {}
    common = dict(id=qid, category=_category(row.record.get("problem_version")), origin=row.origin,
                  meta={k: meta[k] for k in ("subject", "subfield", "source") if k in meta}, **image)
    answer = row.text("answer")
    if kind == "free-form":
        return Question(question=text, answer=answer, **common)
    if kind != "multi-choice":
        raise row.fail("question_type", f"{kind!r} is neither multi-choice nor free-form")
    header = _CHOICES_HEADER.search(text)
    options: tuple[str, ...] = ()
    if header:
        block = text[header.end():].strip()
        starts = [m.start() for m in _CHOICE_LINE.finditer(block)]
        if starts and starts[0] == 0:
            pieces = [block[a:b] for a, b in zip(starts, [*starts[1:], len(block)], strict=True)]
            options = lettered_options(row, "question", [p.strip() for p in pieces])
            text = text[: header.start()].strip() or _VISION_ONLY
    return Question(question=text, options=options, choice=True, answer=choice_answer(row, "answer", answer, options),
                    **common)


_IMAGE_MARKER = re.compile(r"<image\d*>")


def _mathvision(row: Row, qid: str, image: dict) -> Question:
    options = row.get("options")
    if options is None:
        options = []
    if not isinstance(options, list) or not all(isinstance(o, str | int | float) for o in options):
        raise row.fail("options", f"expected a list of option texts (empty for free form), got {options!r}")
    options_t = tuple(str(o).strip() for o in options)
    answer = row.text("answer")
    common = dict(id=qid, question=_question(row, drop=_IMAGE_MARKER), category=_category(row.record.get("subject")),
                  origin=row.origin, meta={"level": row.record["level"]} if "level" in row.record else {}, **image)
    if options_t:
        return Question(options=options_t, choice=True, answer=choice_answer(row, "answer", answer, options_t), **common)
    return Question(answer=answer, **common)


FORMATS: dict[str, BenchmarkFormat] = {
    f.name: f
    for f in (
        BenchmarkFormat("mathvista", ("pid", "question", "question_type", "choices", "answer"),
                        ("decoded_image", "image"), "pid", _mathvista),
        BenchmarkFormat("wemath", ("ID", "question", "option", "answer"), ("image_path",), "ID", _wemath),
        BenchmarkFormat("mathverse", ("sample_index", "problem_version", "question", "question_type", "answer"),
                        ("image",), "sample_index", _mathverse),
        BenchmarkFormat("mathvision", ("id", "question", "options", "answer"), ("decoded_image", "image"), "id",
                        _mathvision),
    )
}
BENCHMARKS = (*FORMATS, "generic")


def _generic_format(data: DataConfig) -> BenchmarkFormat:
    return BenchmarkFormat("generic", (data.problem_key, data.answer_key), (data.image_key,), data.id_key)


def matching_formats(record: object, data: DataConfig) -> list[str]:
    """The benchmarks whose required fields the record has (most specific first)."""
    if not isinstance(record, dict):
        return []
    found = [name for name, f in FORMATS.items() if not f.missing(record)]
    return found or (["generic"] if not _generic_format(data).missing(record) else [])


def _mismatch(row: Row, fmt: BenchmarkFormat, data: DataConfig) -> ValueError:
    if not isinstance(row.record, dict):
        return row.fail(None, f"expected a JSON object, got {type(row.record).__name__}")
    others = [name for name in matching_formats(row.record, data) if name != fmt.name]
    hint = f"; it looks like a {others[0]} row (--benchmark {others[0]})" if others else ""
    expected = [*fmt.required, " or ".join(fmt.images)]
    return row.fail(None, f"not a {fmt.name} row: missing {fmt.missing(row.record)}; {fmt.name} rows have "
                          f"{expected}, this one has {sorted(row.record)}{hint}")


def detect_benchmark(path: Path, data: DataConfig) -> str:
    """The benchmark whose fields the file's first row has; ValueError naming the fields otherwise."""
    if path.is_dir() and hf_folder_kind(path) is None:
        return "generic"
    first = next(iter(read_rows(path)), None)
    if first is None:
        raise ValueError(f"{path}: empty benchmark file (no rows)")
    found = matching_formats(first.record, data)
    if not found:
        keys = sorted(first.record) if isinstance(first.record, dict) else type(first.record).__name__
        expected = {name: [*f.required, " or ".join(f.images)] for name, f in FORMATS.items()}
        expected["generic"] = [data.problem_key, data.image_key, data.answer_key]
        raise ValueError(f"{first.origin}: cannot tell the benchmark from the fields {keys}; expected the fields of "
                         + "; ".join(f"{name} {fields}" for name, fields in expected.items()))
    return found[0]


def load_questions(path: str | Path, benchmark: str, data: DataConfig, *, limit: int | None = None) -> list[Question]:
    """The first ``limit`` (all by default) questions of ``path`` read as ``benchmark`` (or ``auto``)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if benchmark == "auto":
        benchmark = detect_benchmark(path, data)
    if benchmark == "generic":
        return generic_questions(path, data, limit=limit)
    if benchmark not in FORMATS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected auto or one of {BENCHMARKS}")
    fmt = FORMATS[benchmark]
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for row in read_rows(path):
        if not isinstance(row.record, dict) or fmt.missing(row.record):
            raise _mismatch(row, fmt, data)
        qid = row.text(fmt.id_field)
        row.id = qid
        if qid in seen:
            raise row.fail(fmt.id_field, f"duplicate id {qid!r} (first at {seen[qid]})")
        seen[qid] = f"row {row.index}"
        source, size = checked_image(row, fmt.images, max_decode_pixels=data.max_decode_pixels)
        assert fmt.parse is not None
        questions.append(fmt.parse(row, qid, {"image": source, "image_size": size}))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise ValueError(f"{path}: empty benchmark file (no rows)")
    return questions
