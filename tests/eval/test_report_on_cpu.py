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
from mmupt_megatron.eval.prompts import eval_items
from mmupt_megatron.eval.report import build_report, intermediate_ks, markdown_table, write_report
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
    items = eval_items(questions, DataConfig())
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
    assert len(table) == 5


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
