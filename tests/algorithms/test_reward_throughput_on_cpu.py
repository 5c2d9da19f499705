"""The reward-throughput benchmark runs end to end on a small batch and reports what it claims to."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import reward_throughput as bench


@pytest.mark.parametrize("batch", ["expressions", "expressions-heldout", "expressions-fresh"])
def test_every_spelling_of_a_value_is_one_value(batch):
    """The generator's ground truth holds: the spellings of one value are equal, of two values not."""
    responses, group_ids, truth = bench.make_data(60, 10, 3, bench.BATCHES[batch])
    assert len(responses) == len(group_ids) == len(truth) == 60 and set(truth) <= {-1.0, 0.0, 1.0}
    for kind in bench.BATCHES[batch]:
        value = bench.candidate_values(kind, random.Random(1))[0]
        spellings = bench.spellings(kind, value)
        assert len(set(spellings)) == len(spellings) >= 3


def test_table_rows_and_ratios(capsys):
    bench.print_table("expressions", 100, 10, seed=5, workers=0, reference=True)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| baseline: Counter + mathruler", "| math-verify path (no fast path)", "| ours: exact fast path, in-process"]
    ours = rows[2].split(" | ")
    assert ours[2] == "1.0000" and ours[3] == "1.0000" and ours[4] == "0"  # truth, verdicts, math-verify calls
    assert rows[0].rstrip(" |").endswith("1.0x")
