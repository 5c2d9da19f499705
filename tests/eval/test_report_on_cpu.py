"""The report and table from scripted responses (no engine): hand-computed metrics, categories, records."""

import io
import json
from pathlib import Path

import pytest

from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.config import DataConfig
from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.eval import load_questions
from mmupt_megatron.eval.cli import Progress
from mmupt_megatron.eval.model import ServedModel
from mmupt_megatron.eval.prompts import benchmark_items
from mmupt_megatron.eval.report import (
    build_report,
    four_dimensional,
    four_dimensional_table,
    intermediate_ks,
    markdown_table,
    write_report,
)
from mmupt_megatron.eval.evaluator import evaluate
from tests.eval import fixtures as fx

# mathvista fixture: 1 (ref B, FQA), 2 (ref 1.5, GPS), 3 (ref 2, GPS), 4 (ref C, FQA)
GREEDY = {"1": "so \\boxed{B}", "2": "\\boxed{1.5}", "3": "I do not know", "4": "\\boxed{A}"}
SAMPLED = {
    "1": ["\\boxed{B}", "\\boxed{A}", "no box", "\\boxed{(B)}"],  # 2 of 4 right; B wins 2:1
    "2": ["\\boxed{1.50}", "\\boxed{2}", "\\boxed{2}", "\\boxed{3/2}"],  # 2 right; 2 vs 3/2 tie -> "2" wins
    "3": ["", "?", "\\boxed{}", "\\boxed{"],  # nobody answers
    "4": ["\\boxed{C}"] * 4,
}


def scripted_generate(items):
    by_prompt = {item.prompt: item.id for item in items}

    def generate(requests, spec):
        out = []
        for index, request in enumerate(requests):
            qid = by_prompt[request.prompt]
            texts = [GREEDY[qid]] if spec.temperature == 0 else SAMPLED[qid]
            assert len(texts) == spec.n
            out.extend(Rollout(group_id=request.group_id, prompt_index=index, sample_index=s, prompt_token_ids=[1],
                               response_token_ids=list(range(len(t))), response_logprobs=[0.0] * len(t), text=t,
                               finish_reason="stop") for s, t in enumerate(texts))
        return out

    return generate


@pytest.fixture()
def report(tmp_path):
    questions = load_questions(fx.write_mathvista(tmp_path), "mathvista", DataConfig())
    items = benchmark_items(questions, DataConfig())
    calls = []
    result = evaluate(scripted_generate(items), items, k=4, batch_size=3, matcher=AnswerMatcher(use_math_verify=False),
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 4), (4, 4)]
    served = ServedModel(path=Path("/m"), source=Path("/m"), format="hf")
    return build_report(result=result, questions=questions, benchmark="mathvista", data="testmini.json", model=served,
                        config={"recipe": "demo"}, timings={"total": 1.0})


def test_hand_computed_metrics(report):
    m = report["metrics"]
    assert m["greedy"] == 0.5
    assert m["pass@1"] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)
    # pass@2 from 4 samples with 2 right: 1 - C(2,2)/C(4,2) = 5/6
    assert m["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 0 + 1) / 4)
    assert m["pass@4"] == 0.75 and m["maj@4"] == 0.5
    assert m["no_answer"] == pytest.approx((0.25 + 0 + 1 + 0) / 4)
    assert m["majority_share"] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)


def test_records_and_categories(report):
    records = {r["id"]: r for r in report["questions"]}
    # the winning cluster {B, (B)} is reported by its most common spelling, ties to the smallest
    assert records["1"]["sampled_answers"] == ["B", "A", None, "(B)"] and records["1"]["majority_answer"] == "(B)"
    assert records["1"]["options"] == {"A": "yes", "B": "no"} and records["1"]["reference"] == "B"
    assert records["2"]["majority_answer"] == "2" and records["2"]["sampled_correct"] == [True, False, False, True]
    assert records["3"]["majority_answer"] is None and records["3"]["greedy_answer"] is None
    assert records["4"]["greedy_answer"] == "A" and records["4"]["scores"]["greedy"] == 0.0
    fqa, gps = report["by_category"]["figure question answering"], report["by_category"]["geometry problem solving"]
    assert (fqa["questions"], gps["questions"]) == (2, 2)
    assert (fqa["pass@1"], fqa["maj@4"], gps["pass@1"], gps["maj@4"]) == (0.75, 1.0, 0.25, 0.0)


def test_json_round_trip_and_table(report, tmp_path):
    path = write_report(report, tmp_path / "out" / "report.json")
    assert json.loads(path.read_text()) == report
    table = markdown_table(report).splitlines()
    assert table[0] == ("| category | questions | greedy | pass@1 | maj@4 | pass@4 | majority share | no answer "
                        "| length |")
    assert table[2] == "| **all** | 4 | 0.500 | 0.500 | 0.500 | 0.750 | 0.500 | 0.312 | 8.0 |"
    assert table[3].startswith("| figure question answering | 2 | 0.500 | 0.750 | 1.000 | 1.000 |")
    # the benchmark's own tables follow; MathVista's task table is the category table and is not repeated
    assert table[5:] == [
        "",
        "| skill | questions | greedy | pass@1 | maj@4 | pass@4 | majority share | no answer | length |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| statistical reasoning | 4 | 0.500 | 0.500 | 0.500 | 0.750 | 0.500 | 0.312 | 8.0 |",
    ]
    assert report["tables"]["task"] == report["by_category"] and report["loading"] == {"loaded": 4, "skipped": 0}
    # the benchmark's own metadata is kept per question
    meta = {r["id"]: r["meta"] for r in report["questions"]}
    assert meta["2"] == {"question_type": "free_form", "answer_type": "float", "unit": "cm", "precision": 1.0,
                         "source": "FigureQA", "skills": ["statistical reasoning"], "task": "geometry problem solving"}


def record(qid, steps, part, right, maj_right=None):
    right = float(right)
    scores = {"greedy": right, "maj@4": right if maj_right is None else float(maj_right)}
    return {"id": f"{qid}:{part}", "meta": {"ID": qid, "steps": steps, "part": part}, "scores": scores}


def test_wemath_four_measures_by_hand():
    records = [
        *[record("a", 2, p, r) for p, r in (("1", 1), ("2", 1), ("multi", 1))],  # CM
        *[record("b", 2, p, r) for p, r in (("1", 1), ("2", 1), ("multi", 0))],  # IG
        *[record("c", 3, p, r) for p, r in (("1", 1), ("2", 0), ("3", 1), ("multi", 0))],  # IK
        *[record("d", 3, p, r) for p, r in (("1", 0), ("2", 1), ("3", 1), ("multi", 1))],  # RM (strict), CM (loose)
        *[record("e", 2, p, r) for p, r in (("1", 0), ("2", 0), ("multi", 1))],  # RM (strict and loose)
        record("f", 2, "multi", 1),  # its sub-problems were not evaluated: left out
    ]
    m = four_dimensional(records)
    assert (m["problems"], m["incomplete"]) == (5, 1)
    assert m["counts"] == {"IK": 1, "IG": 1, "CM": 1, "RM": 2, "CM_loose": 2, "RM_loose": 1}
    assert m["rates"]["IK"] == m["rates"]["IG"] == m["rates"]["CM"] == 0.2
    assert m["rates"]["RM"] == pytest.approx(2 / 3) and m["rates"]["RM_loose"] == pytest.approx(1 / 3)
    assert m["score"] == pytest.approx((5 - 0.5 - 2 - 1) / 5) and m["score_loose"] == pytest.approx((5 - 0.5 - 1 - 1) / 5)
    assert four_dimensional(records, "maj@4")["counts"] == m["counts"]
    table = four_dimensional_table(m)
    assert table[0] == "We-Math four measures from greedy (5 multi-step problems, 1 incomplete)"
    assert table[3] == "| strict | 0.200 (1) | 0.200 (1) | 0.200 (1) | 0.667 (2) | 0.300 |"


def test_wemath_report_has_the_steps_table_and_the_four_measures(tmp_path):
    questions = load_questions(fx.write_wemath(tmp_path), "wemath", DataConfig())
    items = benchmark_items(questions, DataConfig())
    # every sub-problem right; the 2-step problem's multi-step answer wrong (IG), the 3-step one's right (CM)
    answers = {q.id: q.answer if q.id != "2steps_1:2steps_multi" else "A" for q in questions}

    def generate(requests, spec):
        by_prompt = {item.prompt: item.id for item in items}
        return [Rollout(group_id=r.group_id, prompt_index=i, sample_index=s, prompt_token_ids=[1],
                        response_token_ids=[1, 2], response_logprobs=[0.0, 0.0], finish_reason="stop",
                        text=f"\\boxed{{{answers[by_prompt[r.prompt]]}}}")
                for i, r in enumerate(requests) for s in range(spec.n)]

    result = evaluate(generate, items, k=2, matcher=AnswerMatcher(use_math_verify=False))
    served = ServedModel(path=Path("/m"), source=Path("/m"), format="hf")
    report = build_report(result=result, questions=questions, benchmark="wemath", data="testmini.json", model=served,
                          config={}, timings={}, loading={"rows_read": 9, "loaded": 7, "skipped": 2,
                                                          "skipped_by_reason": {"option: empty option": 2}})
    steps = report["tables"]["steps"]
    assert {name: (row["questions"], row["greedy"]) for name, row in steps.items()} == {
        "one-step": (5, 1.0), "two-step": (1, 0.0), "three-step": (1, 1.0)}
    greedy = report["wemath_4d"]["greedy"]
    assert greedy["counts"] == {"IK": 0, "IG": 1, "CM": 1, "RM": 0, "CM_loose": 1, "RM_loose": 0}
    text = markdown_table(report)
    assert "| steps | questions |" in text and "| three-step | 1 | 1.000 |" in text
    assert "We-Math four measures from maj@2 (2 multi-step problems, 0 incomplete)" in text
    assert "| strict | 0.000 (0) | 0.500 (1) | 0.500 (1) | 0.000 (0) | 0.750 |" in text
    assert text.endswith("skipped 2 of 9 rows (option: empty option: 2)")


def test_intermediate_ks():
    assert intermediate_ks(1) == [] and intermediate_ks(2) == [] and intermediate_ks(8) == [2, 4]
    assert intermediate_ks(10) == [2, 4, 8]


class FakeStream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    bar, lines = FakeStream(True), FakeStream(False)
    for stream in (bar, lines):
        progress = Progress(4, stream=stream)
        progress(3, 4)
        progress(4, 4)
        progress.close()
    assert "eval: 3/4 questions" in lines.getvalue() and "eval: 4/4 questions" in lines.getvalue()
    assert "4/4" in bar.getvalue() and "100%" in bar.getvalue() and "questions" not in bar.getvalue()
