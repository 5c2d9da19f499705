"""Loaders for local copies of MathVista, We-Math, MathVerse and MathVision as published, and our own row format.

Each reads the files the benchmark publishes (JSON / JSONL in its repository, or the Hugging Face parquet
copy with images embedded) into ``Question``s, with the benchmark's own id, metadata and report tables:

- ``mathvista`` (testmini.json keyed by pid, or parquet): ``pid``, ``question``, ``image`` (relative path)
  and/or ``decoded_image``, ``choices`` (list, or null for free form), ``question_type``
  (multi_choice | free_form), ``answer_type`` (integer | float | text | list), ``unit``, ``precision``,
  ``answer`` (the choice's *text* for multiple choice: read as text first), ``metadata`` (``task``,
  ``skills``, ``category``, ``context``, ``grade``, ``source``...). Category and table ``task``: metadata.task;
  table ``skill``: each of metadata.skills. Free-form hints: the unit and the decimal places asked for.
- ``wemath`` (testmini.json or parquet): ``ID`` (shared by a problem's one-step sub-problems and the
  multi-step problem), ``key`` (``2steps_1``, ``2steps_2``, ``2steps_multi``, ``3steps_1`` ... ``3steps_multi``):
  a question is ``ID`` + ``key``. ``option`` is one string ("A. 3;B. 4; E. No correct answer", also without
  separators or with a skipped letter), ``answer`` a letter, ``image_path``, ``knowledge concept``,
  ``question number``. Category: knowledge concept; table ``steps``: one-step (the sub-problems), two-step
  and three-step (the multi-step problems); the report adds the IK / IG / CM / RM measures (report.py).
- ``mathverse`` (testmini.json, testmini_text_only.json, or parquet): ``sample_index``, ``problem_index``,
  ``problem_version``, ``question`` (multiple choice lists "Choices:\\nA:...\\nB:..." or "Choice:" inside it;
  empty for Vision Only, whose choices are in the image), ``image`` (absent or empty in the Text Only file),
  ``answer`` (a letter; two letters "C\\nD" when both are right: the reference is then "C, D"),
  ``question_type`` (multi-choice | free-form), ``metadata`` (``subject``, ``subfield``, ``source``).
  Category and table ``version``: problem_version; table ``subject``.
- ``mathvision`` (data/test.jsonl with images/ at the repository root, or parquet): ``id``, ``question``
  (with ``<image1>`` markers, dropped; a question that is only the marker is asked from the image), ``options``
  (list; empty for free form, or with a letter answer when the options are drawn in the image), ``image``
  and/or ``decoded_image``, ``answer``, ``level``, ``subject``. Category and table ``subject``; table ``level``.
- ``generic``: the training row format (``data.problem_key`` / ``image_key`` / ``answer_key``; parquet, JSONL
  or a folder of them), read by ``mmupt_megatron.data``; one category.

Departures from the benchmarks' own scorers: answers are the last ``\\boxed{}`` and are compared with the
training equivalence (exact rationals, letters, math-verify); there is no LLM answer extractor, and
MathVista floats are not rounded to ``precision`` (the prompt asks for that many decimals instead).

Extra fields are ignored. A row missing a field its benchmark needs, or one that cannot be read as
published, is an error naming the file, row and field (``eval.on_bad_row=error``, the default), or is skipped
and counted by reason in the report (``eval.on_bad_row=skip``); never a silently different question.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.sources import hf_folder_kind
from mmupt_megatron.eval.generic import generic_questions
from mmupt_megatron.eval.rows import (
    BadRow,
    Question,
    Row,
    checked_answer,
    checked_image,
    choice_answer,
    image_dirs,
    letter_of,
    present_image,
    read_rows,
    repair_escapes,
    split_options,
)

BAD_ROW_POLICIES = ("error", "skip")
VISION_ONLY = "Answer the question shown in the image."


@dataclass(frozen=True)
class BenchmarkFormat:
    name: str
    required: tuple[str, ...]
    images: tuple[str, ...]
    """Image fields, in order of preference; a row needs one of them unless ``text_only`` allows none."""
    id_fields: tuple[str, ...]
    """The benchmark's own key of a question (We-Math: ID + key)."""
    parse: Callable[[Row, str, dict], Question] | None = None
    """(row, id, image kwargs) -> Question; None for ``generic`` (read by ``mmupt_megatron.data``)."""
    text_only: Callable[[dict], bool] | None = None
    """Rows for which no image is expected (MathVerse's Text Only version)."""

    def missing(self, record: dict) -> list[str]:
        missing = [name for name in self.required if name not in record]
        if not any(name in record for name in self.images) and not (self.text_only and self.text_only(record)):
            missing.append(" or ".join(self.images))
        return missing


def _category(value: object) -> str:
    return str(value).strip() if value not in (None, "") and str(value).strip() else "all"


def _question(row: Row, *, drop: re.Pattern | None = None, fallback: str | None = None) -> str:
    text = row.text("question", allow_empty=fallback is not None)
    text = repair_escapes(text, commands=False)[0]
    if drop is not None:
        text = re.sub(r"[ \t]{2,}", " ", drop.sub("", text)).strip()
    if not text and fallback is None:
        raise row.fail("question", "empty")
    return text or fallback  # type: ignore[return-value]


def _metadata(row: Row) -> dict:
    meta = row.record.get("metadata")
    if meta in (None, ""):
        return {}
    if not isinstance(meta, dict):
        raise row.fail("metadata", f"expected an object, got {type(meta).__name__}")
    return meta


def _kept(record: dict, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``names`` the record has, without nulls and NaNs (parquet's missing values)."""
    out = {}
    for name in names:
        value = record.get(name)
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            continue
        out[name] = value
    return out


def _mathvista(row: Row, qid: str, image: dict) -> Question:
    kind = row.text("question_type")
    meta_in = _metadata(row)
    skills = meta_in.get("skills") or []
    if isinstance(skills, str):
        skills = [skills]
    task = _category(meta_in.get("task"))
    meta = {**_kept(row.record, ("question_type", "answer_type", "unit", "precision")),
            **_kept(meta_in, ("source", "category", "context", "grade", "language", "skills", "task"))}
    common = dict(id=qid, question=_question(row), category=task, origin=row.origin, meta=meta,
                  groups={"task": (task,), "skill": tuple(str(s) for s in skills) or ("none",)}, **image)
    answer = checked_answer(row, "answer", row.text("answer"), meta)
    if kind == "multi_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str | int | float) for c in choices):
            raise row.fail("choices", f"a multi_choice question needs a non-empty list of choices, got {choices!r}",
                           reason="multi_choice without choices")
        options = tuple(str(c).strip() for c in choices)
        return Question(options=options, choice=True, answer=choice_answer(row, "answer", answer, options, published="text"),
                        **common)
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


_WEMATH_KEY = re.compile(r"([23])steps_(\d+|multi)")
WEMATH_STEPS = {"1": "one-step", "2": "two-step", "3": "three-step"}


def wemath_key(key: str) -> tuple[int, str] | None:
    """(steps of the problem, ``multi`` or the sub-problem's number) from We-Math's ``key``; None for a key
    outside that scheme (such a question is still evaluated, under steps ``other``)."""
    match = _WEMATH_KEY.fullmatch(key)
    if not match or (match.group(2) != "multi" and not 1 <= int(match.group(2)) <= int(match.group(1))):
        return None
    return int(match.group(1)), match.group(2)


def _wemath(row: Row, qid: str, image: dict) -> Question:
    key = row.text("key")
    letters, options = split_options(row, "option", row.text("option"))
    meta = {"ID": row.text("ID"), "key": key, **_kept(row.record, ("split", "question number"))}
    scheme = wemath_key(key)
    if scheme is not None:
        meta["steps"], meta["part"] = scheme
        level = WEMATH_STEPS[str(scheme[0])] if scheme[1] == "multi" else WEMATH_STEPS["1"]
    else:
        level = "other"
    answer = choice_answer(row, "answer", checked_answer(row, "answer", row.text("answer"), meta), options, letters)
    return Question(id=qid, question=_question(row), options=options, letters=letters, choice=True, answer=answer,
                    category=_category(row.record.get("knowledge concept")), groups={"steps": (level,)},
                    origin=row.origin, meta=meta, **image)


_CHOICES_HEADER = re.compile(r"(?:^|\n)[ \t]*Choices?[ \t]*[:：][ \t]*\n?", re.IGNORECASE)
_TEXT_ONLY = "Text Only"


def _mathverse_text_only(record: dict) -> bool:
    return str(record.get("problem_version", "")).strip() == _TEXT_ONLY


def _mathverse(row: Row, qid: str, image: dict) -> Question:
    kind = row.text("question_type")
    version = _category(row.record.get("problem_version"))
    text = _question(row, fallback=VISION_ONLY)
    meta_in = _metadata(row)
    meta = {**_kept(row.record, ("problem_index", "problem_version", "question_type")),
            **_kept(meta_in, ("subject", "subfield", "source"))}
    common = dict(id=qid, category=version, origin=row.origin, meta=meta,
                  groups={"version": (version,), "subject": (_category(meta_in.get("subject")),)}, **image)
    answer = checked_answer(row, "answer", row.text("answer"), meta, allow_newlines=True)
    if kind == "free-form":
        if "\n" in answer:
            raise row.fail("answer", f"a free-form answer on several lines: {answer!r}", reason="multi-line answer")
        return Question(question=text, answer=answer, **common)
    if kind != "multi-choice":
        raise row.fail("question_type", f"{kind!r} is neither multi-choice nor free-form")
    header = _CHOICES_HEADER.search(text)
    letters: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    if header:
        letters, options = split_options(row, "question", text[header.end():].strip())
        text = text[: header.start()].strip() or VISION_ONLY
    else:
        meta["options_in_image"] = True
    parts = [p.strip() for p in answer.split("\n") if p.strip()]
    if len(parts) > 1:
        found = [letter_of(p) for p in parts]
        if None in found or (letters and any(f not in letters for f in found)):
            raise row.fail("answer", f"{answer!r}: several answers, but not all are option letters {list(letters)}",
                           reason="several answers, not all letters")
        meta["answers"] = sorted(set(found))
        return Question(question=text, options=options, letters=letters, choice=True,
                        answer=", ".join(meta["answers"]), **common)
    return Question(question=text, options=options, letters=letters, choice=True,
                    answer=choice_answer(row, "answer", answer, options, letters), **common)


_IMAGE_MARKER = re.compile(r"<image\d*>")


def _mathvision(row: Row, qid: str, image: dict) -> Question:
    options = row.get("options")
    if options is None:
        options = []
    if not isinstance(options, list) or not all(isinstance(o, str | int | float) for o in options):
        raise row.fail("options", f"expected a list of option texts (empty for free form), got {options!r}",
                       reason="options is not a list")
    options_t = tuple(str(o).strip() for o in options)
    meta = _kept(row.record, ("level", "subject"))
    answer = checked_answer(row, "answer", row.text("answer"), meta)
    subject = _category(row.record.get("subject"))
    level = row.record.get("level")
    common = dict(id=qid, question=_question(row, drop=_IMAGE_MARKER, fallback=VISION_ONLY), category=subject,
                  groups={"subject": (subject,), "level": (f"level {level}" if level not in (None, "") else "all",)},
                  origin=row.origin, meta=meta, **image)
    if options_t:
        return Question(options=options_t, choice=True, answer=choice_answer(row, "answer", answer, options_t), **common)
    if letter_of(answer) is not None:
        meta["options_in_image"] = True
        return Question(choice=True, answer=choice_answer(row, "answer", answer, ()), **common)
    return Question(answer=answer, **common)


FORMATS: dict[str, BenchmarkFormat] = {
    f.name: f
    for f in (
        BenchmarkFormat("mathvista", ("pid", "question", "question_type", "choices", "answer"),
                        ("decoded_image", "image"), ("pid",), _mathvista),
        BenchmarkFormat("wemath", ("ID", "key", "question", "option", "answer"), ("image_path",), ("ID", "key"),
                        _wemath),
        BenchmarkFormat("mathverse", ("sample_index", "problem_version", "question", "question_type", "answer"),
                        ("image",), ("sample_index",), _mathverse, text_only=_mathverse_text_only),
        BenchmarkFormat("mathvision", ("id", "question", "options", "answer"), ("decoded_image", "image"), ("id",),
                        _mathvision),
    )
}
BENCHMARKS = (*FORMATS, "generic")


def _generic_format(data: DataConfig) -> BenchmarkFormat:
    return BenchmarkFormat("generic", (data.problem_key, data.answer_key), (data.image_key,), (data.id_key,))


def matching_formats(record: object, data: DataConfig) -> list[str]:
    """The benchmarks whose required fields the record has (most specific first)."""
    if not isinstance(record, dict):
        return []
    found = [name for name, f in FORMATS.items() if not f.missing(record)]
    return found or (["generic"] if not _generic_format(data).missing(record) else [])


def _mismatch(row: Row, fmt: BenchmarkFormat, data: DataConfig) -> BadRow:
    if not isinstance(row.record, dict):
        return row.fail(None, f"expected a JSON object, got {type(row.record).__name__}", reason="not an object")
    others = [name for name in matching_formats(row.record, data) if name != fmt.name]
    hint = f"; it looks like a {others[0]} row (--benchmark {others[0]})" if others else ""
    expected = [*fmt.required, " or ".join(fmt.images)]
    missing = fmt.missing(row.record)
    return row.fail(None, f"not a {fmt.name} row: missing {missing}; {fmt.name} rows have "
                          f"{expected}, this one has {sorted(row.record)}{hint}", reason=f"missing {missing}")


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


@dataclass
class Loaded:
    """What ``load_benchmark`` read: the questions, and the rows it skipped (``eval.on_bad_row=skip``)."""

    benchmark: str
    questions: list[Question]
    rows_read: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """One record per skipped row: origin, field, reason, message."""

    def skip_summary(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "loaded": len(self.questions), "skipped": len(self.skipped),
                "skipped_by_reason": dict(Counter(s["reason"] for s in self.skipped).most_common()),
                "skipped_rows": self.skipped,
                "repaired_answers": sum("repaired_answer" in q.meta for q in self.questions)}


def _row_id(row: Row, fmt: BenchmarkFormat) -> str:
    return ":".join(row.text(name) for name in fmt.id_fields)


def load_benchmark(path: str | Path, benchmark: str, data: DataConfig, *, limit: int | None = None,
                   on_bad_row: str = "error", images: str | Path | None = None) -> Loaded:
    """The first ``limit`` (all by default) questions of ``path`` read as ``benchmark`` (or ``auto``); a bad row
    raises (``on_bad_row="error"``) or is skipped and recorded (``"skip"``); relative image paths are looked up
    in ``images``, the file's folder and its parent."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"eval.on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"--images {images}: not a folder")
    if benchmark == "auto":
        benchmark = detect_benchmark(path, data)
    if benchmark == "generic":
        questions = generic_questions(path, data, limit=limit)
        return Loaded("generic", questions, rows_read=len(questions))
    if benchmark not in FORMATS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected auto or one of {BENCHMARKS}")
    fmt = FORMATS[benchmark]
    dirs = image_dirs(path, images)
    loaded = Loaded(benchmark, [])
    seen: dict[str, str] = {}
    for row in read_rows(path):
        loaded.rows_read += 1
        try:
            loaded.questions.append(_read_row(row, fmt, data, dirs, seen))
        except BadRow as bad:
            if on_bad_row == "error":
                raise
            loaded.skipped.append({"origin": bad.origin, "field": bad.field, "reason": bad.reason, "message": str(bad)})
        if limit is not None and len(loaded.questions) >= limit:
            break
    if not loaded.questions:
        if loaded.skipped:
            reasons = loaded.skip_summary()["skipped_by_reason"]
            raise ValueError(f"{path}: no usable rows: all {len(loaded.skipped)} were skipped ({reasons})")
        raise ValueError(f"{path}: empty benchmark file (no rows)")
    return loaded


def _read_row(row: Row, fmt: BenchmarkFormat, data: DataConfig, dirs: tuple[Path, ...], seen: dict[str, str]) -> Question:
    if not isinstance(row.record, dict) or fmt.missing(row.record):
        raise _mismatch(row, fmt, data)
    qid = _row_id(row, fmt)
    row.id = qid
    if qid in seen:
        what = " + ".join(fmt.id_fields)
        raise row.fail(fmt.id_fields[-1], f"duplicate id {qid!r} ({what}; first at {seen[qid]})", reason="duplicate id")
    if fmt.text_only is not None and fmt.text_only(row.record) and present_image(row, fmt.images) is None:
        image: dict[str, Any] = {"image": None, "image_size": None}
    else:
        source, size = checked_image(row, fmt.images, dirs, max_decode_pixels=data.max_decode_pixels)
        image = {"image": source, "image_size": size}
    assert fmt.parse is not None
    question = fmt.parse(row, qid, image)
    seen[qid] = f"row {row.index}"
    return question


def load_questions(path: str | Path, benchmark: str, data: DataConfig, *, limit: int | None = None,
                   on_bad_row: str = "error", images: str | Path | None = None) -> list[Question]:
    """``load_benchmark``'s questions."""
    return load_benchmark(path, benchmark, data, limit=limit, on_bad_row=on_bad_row, images=images).questions
