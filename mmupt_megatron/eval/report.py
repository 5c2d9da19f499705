"""The JSON report and the printed table of ``mmupt eval``.

The report (``--out``)::

    benchmark, data, model {source, format, served}, k, num_questions
    metrics        mean over questions: greedy, pass@1, pass@2, pass@4, ... (unbiased, from the k samples),
                   pass@k, maj@k, majority_share, no_answer, response_length
    by_category    {category: {questions, <the same metrics>}}
    questions      one record per question: id, category, reference, options, greedy_answer,
                   sampled_answers, sampled_correct, majority_answer, scores, meta
    config         the recipe, its overrides, the eval arguments and the resolved config
    timings        seconds: load, convert, engine_start, generate, total

Every metric is the mean of the per-question ``scores``, so it can be recomputed from the records.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmupt_megatron.algorithms.metrics import pass_at_k
from mmupt_megatron.eval.model import ServedModel
from mmupt_megatron.eval.rows import LETTERS, Question
from mmupt_megatron.eval.evaluator import EvalReport, QuestionResult


def intermediate_ks(k: int) -> list[int]:
    """Powers of two strictly between 1 and k: the extra pass@j the report estimates from k samples."""
    return [j for j in (2**i for i in range(1, k.bit_length())) if j < k]


def _record(result: QuestionResult, question: Question, k: int) -> dict[str, Any]:
    num_correct = sum(result.sampled_correct)
    extra = {f"pass@{j}": pass_at_k(k, num_correct, j) for j in intermediate_ks(k)}
    first = {"pass@1": result.scores["pass@1"], **extra}
    scores = {**first, **{key: value for key, value in result.scores.items() if key not in first}}
    return {
        "id": result.id,
        "category": result.category,
        "reference": result.reference,
        "options": {LETTERS[i]: text for i, text in enumerate(question.options)},
        "greedy_answer": result.greedy_answer,
        "sampled_answers": result.sampled_answers,
        "sampled_correct": result.sampled_correct,
        "majority_answer": result.majority_answer,
        "scores": scores,
        "meta": question.meta,
    }


def _means(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = records[0]["scores"]
    return {key: sum(r["scores"][key] for r in records) / len(records) for key in keys}


def build_report(
    *,
    result: EvalReport,
    questions: Sequence[Question],
    benchmark: str,
    data: str,
    model: ServedModel,
    config: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    assert len(result.questions) == len(questions), "one result per question"
    records = [_record(r, q, result.k) for r, q in zip(result.questions, questions, strict=True)]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
    return {
        "benchmark": benchmark,
        "data": data,
        "model": {"source": str(model.source), "format": model.format, "served": str(model.path)},
        "k": result.k,
        "num_questions": len(records),
        "metrics": _means(records),
        "by_category": {name: {"questions": len(group), **_means(group)} for name, group in sorted(groups.items())},
        "questions": records,
        "config": config,
        "timings": timings,
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return out


def markdown_table(report: dict[str, Any]) -> str:
    """Overall and per-category rows: greedy, pass@1, maj@k, pass@k, majority share, no answer, length."""
    k = report["k"]
    columns = [("greedy", "greedy"), ("pass@1", "pass@1"), (f"maj@{k}", f"maj@{k}"), (f"pass@{k}", f"pass@{k}"),
               ("majority_share", "majority share"), ("no_answer", "no answer"), ("response_length", "length")]
    columns = list(dict(columns).items())  # k = 1: pass@k is pass@1
    header = ["category", "questions", *(title for _, title in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]

    def cells(metrics: dict[str, float]) -> list[str]:
        out = []
        for key, _ in columns:
            value = metrics.get(key)
            out.append("-" if value is None else f"{value:.1f}" if key == "response_length" else f"{value:.3f}")
        return out

    lines.append("| " + " | ".join(["**all**", str(report["num_questions"]), *cells(report["metrics"])]) + " |")
    if len(report["by_category"]) > 1:
        for name, metrics in report["by_category"].items():
            lines.append("| " + " | ".join([name.replace("|", "/"), str(metrics["questions"]), *cells(metrics)]) + " |")
    return "\n".join(lines)
