"""An external equivalence suite: answer pairs from public graders' tests, each with its source and label.

``external_equivalence_cases.jsonl``: one case a line, ``{"class", "a", "b", "equal", "source", "note"?}``.
Sources: the ``is_equiv`` tests of Hendrycks' MATH release, the grader tests of Qwen2.5-Math (its unit
tests, and the examples in its ``_test_math_equal`` as labelled by Math-Verify's port of them), Math-Verify's
own tests (short answers at default precision), and pairs written here to exercise each rule of the Minerva
normalization in lm-evaluation-harness (labelled by what the rule does). Labels are the sources'.

Targets: >= 95% agreement, and no false positive (we never say equal where the source says not).
``python -m tests.algorithms.test_external_equivalence_on_cpu`` prints the table by class.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from mmupt_megatron.algorithms import AnswerMatcher

CASES = [json.loads(line) for line in (Path(__file__).parent / "external_equivalence_cases.jsonl").read_text().splitlines()]


def table(matcher: AnswerMatcher) -> dict[str, dict[str, int]]:
    """Per class: cases, agreements, false positives (we say equal, the source not), misses."""
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "agree": 0, "false_positive": 0, "miss": 0})
    for case in CASES:
        ours = matcher.equal(case["a"], case["b"])
        assert ours == matcher.equal(case["b"], case["a"]), f"asymmetric: {case}"
        row = rows[case["class"]]
        row["cases"] += 1
        row["agree"] += ours == case["equal"]
        row["false_positive"] += ours and not case["equal"]
        row["miss"] += case["equal"] and not ours
    return dict(rows)


def test_every_case_names_its_source_and_is_unique():
    assert len(CASES) >= 100
    assert all(case["source"] and case["class"] and isinstance(case["equal"], bool) for case in CASES)
    assert len({(case["a"], case["b"]) for case in CASES}) == len(CASES)
    assert {case["source"].split()[0] for case in CASES} == {
        "hendrycks/math", "QwenLM/Qwen2.5-Math", "huggingface/Math-Verify", "EleutherAI/lm-evaluation-harness"}


@pytest.mark.slow  # ~10 s on 2 cores (solve-based equation checks)
def test_external_suite_agreement_and_no_false_positive():
    rows = table(AnswerMatcher(timeout_s=0))
    total = {key: sum(row[key] for row in rows.values()) for key in ("cases", "agree", "false_positive", "miss")}
    assert total["false_positive"] == 0, {name: row for name, row in rows.items() if row["false_positive"]}
    assert total["agree"] / total["cases"] >= 0.95, rows


if __name__ == "__main__":
    rows = table(AnswerMatcher(timeout_s=0))
    print("| class | cases | agreement | false positives | misses |\n|---|---|---|---|---|")
    for name, row in sorted(rows.items()):
        print(f"| {name} | {row['cases']} | {row['agree'] / row['cases']:.3f} | {row['false_positive']} | {row['miss']} |")
    total = {key: sum(row[key] for row in rows.values()) for key in ("cases", "agree", "false_positive", "miss")}
    print(f"| all | {total['cases']} | {total['agree'] / total['cases']:.3f} | {total['false_positive']} | {total['miss']} |")
