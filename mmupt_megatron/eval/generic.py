"""``--benchmark generic``: held-out rows in the training format (``data.*`` keys), as evaluation questions.

Rows are read and checked by ``mmupt_megatron.data`` (the same rules and messages as training data); every
row needs an answer. Free form, one category.
"""

from __future__ import annotations

from pathlib import Path

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.configured import open_dataset
from mmupt_megatron.eval.rows import Question


def generic_questions(path: str | Path, data: DataConfig, *, limit: int | None = None) -> list[Question]:
    dataset = open_dataset([str(path)], data)
    questions = []
    for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
        sample, image = dataset[index]
        if sample.answer is None or not sample.answer.strip():
            raise ValueError(f"{sample.origin}, field {data.answer_key!r}: evaluation rows need an answer")
        questions.append(Question(id=sample.id, question=sample.question, answer=sample.answer.strip(),
                                  image=sample.image_source, image_size=image.size, origin=sample.origin))
    return questions
