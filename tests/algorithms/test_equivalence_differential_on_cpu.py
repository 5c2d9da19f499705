"""Differential tests of ``AnswerMatcher`` against math-verify 0.9.0 (defaults, both directions).

Whenever math-verify says "not equal" in both directions, the matcher must too, unless the pair differs
only by a documented deliberate difference (``answer_forms.DELIBERATE_DIFFERENCES``, rewritten for the
oracle by ``mv_oracle.deliberate``). And the matcher is symmetric. Examples are derandomized (the same on
every run); ``MMUPT_EQUIV_EXAMPLES=5000`` runs a longer search.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from mmupt_megatron.algorithms import AnswerMatcher
from tests.algorithms.answer_strategies import answer_pairs
from tests.algorithms.mv_oracle import allowed_equal

_MATCHER = AnswerMatcher(timeout_s=5.0)
_EXAMPLES = int(os.environ.get("MMUPT_EQUIV_EXAMPLES", "250"))


@pytest.mark.slow  # ~10-20 s on 2 cores
@settings(max_examples=_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(answer_pairs())
def test_never_equal_where_math_verify_says_not_equal(pair):
    a, b = pair
    ours = _MATCHER.equal(a, b)
    assert ours == _MATCHER.equal(b, a), f"asymmetric: {a!r} vs {b!r}"
    if ours:
        assert allowed_equal(a, b), f"false positive: {a!r} == {b!r}, math-verify says not equal both ways"
