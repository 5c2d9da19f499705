"""``mmupt eval``: benchmark loaders (MathVista, We-Math, MathVerse, MathVision, our row format), prompts,
model resolution (HF or Megatron checkpoints), the JSON report and the printed table.

The metrics themselves are ``mmupt_megatron.eval.evaluator.evaluate`` (the trainer's held-out evaluation) over
``mmupt_megatron.algorithms.metrics``.
"""

from mmupt_megatron.eval.benchmarks import (
    BENCHMARKS,
    Loaded,
    detect_benchmark,
    load_benchmark,
    load_questions,
)
from mmupt_megatron.eval.rows import BadRow, Question

__all__ = ["BENCHMARKS", "BadRow", "Loaded", "Question", "detect_benchmark", "load_benchmark", "load_questions"]
