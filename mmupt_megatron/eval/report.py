"""The JSON report and the printed table of ``mmupt eval``.

The report (``--out``)::

    benchmark, data, model {source, format, served}, k, num_questions
    metrics        mean over questions: greedy, pass@1, pass@2, pass@4, ... (unbiased, from the k samples),
                   pass@k, maj@k, majority_share, no_answer, response_length
    by_category    {category: {questions, <the same metrics>}}
    tables         the benchmark's own breakdowns, {table: {value: {questions, <metrics>}}}: MathVista task and
                   skill (a question counts under each of its skills), We-Math steps (one-step = the
                   sub-problems, two-/three-step = the multi-step problems), MathVerse version and subject,
                   MathVision subject and level
    wemath_4d      We-Math only: IK / IG / CM / RM over the multi-step problems whose sub-problems were all
                   evaluated, from greedy and from maj@k correctness (see ``four_dimensional``)
    loading        rows read, loaded, skipped (by reason, and each skipped row), answers with repaired escapes
    questions      one record per question: id, category, groups, reference, options, greedy_answer,
                   sampled_answers, sampled_correct, majority_answer, scores, meta (the benchmark's own
                   fields: unit, precision, answer type, version, subject, level, step count, ...)
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
from mmupt_megatron.eval.rows import Question
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
        "groups": {name: list(values) for name, values in question.groups.items()},
        "options": dict(zip(question.labels, question.options, strict=True)),
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
    loading: dict[str, Any] | None = None,
) -> dict[str, Any]:
    assert len(result.questions) == len(questions), "one result per question"
    records = [_record(r, q, result.k) for r, q in zip(result.questions, questions, strict=True)]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
    extra = {"wemath_4d": {key: four_dimensional(records, key) for key in ("greedy", f"maj@{result.k}")}} \
        if benchmark == "wemath" else {}
    return {
        "benchmark": benchmark,
        "data": data,
        "model": {"source": str(model.source), "format": model.format, "served": str(model.path)},
        "k": result.k,
        "num_questions": len(records),
        "metrics": _means(records),
        "by_category": {name: {"questions": len(group), **_means(group)} for name, group in sorted(groups.items())},
        "tables": tables(records),
        **extra,
        "loading": loading or {"loaded": len(records), "skipped": 0},
        "questions": records,
        "config": config,
        "timings": timings,
    }


def tables(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{table: {value: {questions, <metric means>}}} over the records' ``groups``."""
    members: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for table, values in record["groups"].items():
            for value in values:
                members[table][value].append(record)
    return {table: {value: {"questions": len(group), **_means(group)}
                    for value, group in sorted(by_value.items(), key=lambda item: (_ORDER.get(item[0], 9), item[0]))}
            for table, by_value in members.items()}


_ORDER = {"one-step": 1, "two-step": 2, "three-step": 3}
"""Values listed in this order before the others (alphabetical)."""


def four_dimensional(records: Sequence[dict[str, Any]], score: str = "greedy") -> dict[str, Any]:
    """We-Math's four measures over its multi-step problems, from the correctness ``scores[score]`` (1.0 = right).

    A problem (We-Math ``ID``) of n steps has n one-step sub-problems (keys ``{n}steps_1`` .. ``{n}steps_n``)
    and the multi-step problem (``{n}steps_multi``). With every sub-problem right / some wrong and the
    multi-step problem right / wrong: CM (complete mastery) all right; IG (inadequate generalization) all
    sub-problems right, multi-step wrong; IK (insufficient knowledge) some sub-problem and the multi-step
    wrong; RM (rote memorization) some sub-problem wrong, multi-step right. These are We-Math's *strict*
    measures; the *loose* ones count a multi-step right with at least one sub-problem right as CM, and only
    all sub-problems wrong as RM. Rates: IK, IG, CM over the problems; RM over CM + RM. The score is
    (problems - 0.5 IG - RM - IK) / problems. Problems missing a part (--limit, skipped rows) are counted in
    ``incomplete`` and left out."""
    problems: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        meta = record["meta"]
        if "ID" in meta and "part" in meta:
            problems[f"{meta['steps']}steps/{meta['ID']}"][str(meta["part"])] = record
    counts = {"IK": 0, "IG": 0, "CM": 0, "RM": 0, "CM_loose": 0, "RM_loose": 0}
    complete = incomplete = 0
    for name, parts in problems.items():
        steps = int(name.split("steps/", 1)[0])
        if set(parts) != {*map(str, range(1, steps + 1)), "multi"}:
            incomplete += 1
            continue
        complete += 1
        subs = [parts[str(i)]["scores"][score] >= 1.0 for i in range(1, steps + 1)]
        multi = parts["multi"]["scores"][score] >= 1.0
        counts["CM" if all(subs) and multi else "IG" if all(subs) else "RM" if multi else "IK"] += 1
        if multi:
            counts["CM_loose" if any(subs) else "RM_loose"] += 1

    def rate(numerator: int, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    return {
        "correct_by": score, "problems": complete, "incomplete": incomplete, "counts": counts,
        "rates": {"IK": rate(counts["IK"], complete), "IG": rate(counts["IG"], complete),
                  "CM": rate(counts["CM"], complete), "RM": rate(counts["RM"], counts["CM"] + counts["RM"]),
                  "CM_loose": rate(counts["CM_loose"], complete),
                  "RM_loose": rate(counts["RM_loose"], counts["CM_loose"] + counts["RM_loose"])},
        "score": rate(complete - 0.5 * counts["IG"] - counts["RM"] - counts["IK"], complete),
        "score_loose": rate(complete - 0.5 * counts["IG"] - counts["RM_loose"] - counts["IK"], complete),
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return out


def markdown_table(report: dict[str, Any]) -> str:
    """Overall and per-category rows (greedy, pass@1, maj@k, pass@k, majority share, no answer, length), then
    one such table per benchmark table (``tables``), We-Math's four measures, and the skipped rows by reason."""
    k = report["k"]
    columns = [("greedy", "greedy"), ("pass@1", "pass@1"), (f"maj@{k}", f"maj@{k}"), (f"pass@{k}", f"pass@{k}"),
               ("majority_share", "majority share"), ("no_answer", "no answer"), ("response_length", "length")]
    columns = list(dict(columns).items())  # k = 1: pass@k is pass@1

    def cells(metrics: dict[str, float]) -> list[str]:
        out = []
        for key, _ in columns:
            value = metrics.get(key)
            out.append("-" if value is None else f"{value:.1f}" if key == "response_length" else f"{value:.3f}")
        return out

    def table(first: str, rows: dict[str, dict[str, float]], overall: bool) -> list[str]:
        header = [first, "questions", *(title for _, title in columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
        if overall:
            lines.append("| " + " | ".join(["**all**", str(report["num_questions"]), *cells(report["metrics"])]) + " |")
        for name, metrics in rows.items():
            lines.append("| " + " | ".join([name.replace("|", "/"), str(metrics["questions"]), *cells(metrics)]) + " |")
        return lines

    lines = table("category", report["by_category"] if len(report["by_category"]) > 1 else {}, True)
    for name, rows in report.get("tables", {}).items():
        if rows != report["by_category"]:  # a table that repeats the categories is not printed twice
            lines += ["", *table(name, rows, False)]
    for measures in report.get("wemath_4d", {}).values():
        lines += ["", *four_dimensional_table(measures)]
    loading = report.get("loading", {})
    if loading.get("skipped"):
        reasons = "; ".join(f"{reason}: {n}" for reason, n in loading["skipped_by_reason"].items())
        lines += ["", f"skipped {loading['skipped']} of {loading['rows_read']} rows ({reasons})"]
    return "\n".join(lines)


def four_dimensional_table(measures: dict[str, Any]) -> list[str]:
    """We-Math's IK / IG / CM / RM (strict and loose) as a table: rate (count)."""
    rates, counts = measures["rates"], measures["counts"]

    def cell(key: str) -> str:
        return "-" if rates[key] is None else f"{rates[key]:.3f} ({counts[key]})"

    score = "-" if measures["score"] is None else f"{measures['score']:.3f}"
    loose = "-" if measures["score_loose"] is None else f"{measures['score_loose']:.3f}"
    title = (f"We-Math four measures from {measures['correct_by']} ({measures['problems']} multi-step problems, "
             f"{measures['incomplete']} incomplete)")
    return [title,
            "| measure | IK | IG | CM | RM | score |", "|---|---:|---:|---:|---:|---:|",
            f"| strict | {cell('IK')} | {cell('IG')} | {cell('CM')} | {cell('RM')} | {score} |",
            f"| loose | {cell('IK')} | {cell('IG')} | {cell('CM_loose')} | {cell('RM_loose')} | {loose} |"]
