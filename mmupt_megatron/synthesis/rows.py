"""Synthesized questions as data rows, their JSON summary, and the model step a checkpoint records.

Rows keep the input's format (``data.problem_key / image_key / answer_key / id_key``), so the dataset loader
and ``mmupt train`` read them like any other file: the seed row's image (its bytes, embedded, so the file
does not depend on the input's folder), the new question, a null answer (the policy's majority answer is
*not* a label), and provenance columns:

- ``source_id``: the seed row's id; ``synthesis_mode``: in-context or direct; ``model_step``: training
  steps the policy had taken (null when unknown);
- ``majority_share`` / ``majority_answer``: the policy's agreement on the new question (null without
  answering); ``seed_answer_source``: data, majority or none (in-context) — what the prompt showed.

Parquet (``.parquet``), JSON lines (``.jsonl``, image bytes base64) or, for an output without a suffix, a
Hugging Face dataset folder (``save_to_disk``; images as ``datasets.Image``) that ``datasets.load_from_disk``,
``push_to_hub`` and our loader read; chosen by the output's suffix. Outputs are written to a temporary name and
renamed. The summary goes next to the output: ``NAME.summary.json``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.dataset import Sample
from mmupt_megatron.data.sources import hf_folder_kind, write_dataset_folder
from mmupt_megatron.synthesis.run import SynthesisResult, SynthesizedQuestion

OUTPUT_SUFFIXES = (".parquet", ".jsonl", "")
"""``""``: a dataset folder (``save_to_disk``)."""
PROVENANCE_COLUMNS = ("source_id", "synthesis_mode", "model_step", "majority_share", "majority_answer",
                      "seed_answer_source")


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


def check_output_path(out: str | Path, *, force: bool) -> Path:
    """ValueError for an unknown suffix, or an existing output (or summary) without ``force``."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out} must end in one of {OUTPUT_SUFFIXES[:-1]}, or have no suffix "
                         "(a Hugging Face dataset folder)")
    if out.suffix == "" and out.exists() and hf_folder_kind(out) != "saved":
        raise ValueError(f"{out} exists and is not a dataset folder written by save_to_disk; refusing to replace it")
    existing = [p for p in (out, summary_path(out)) if p.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite it")
    return out


def _image_bytes(sample: Sample) -> tuple[bytes, str | None]:
    source = sample.image_source
    if isinstance(source, bytes | bytearray):
        return bytes(source), None
    try:
        return Path(source).read_bytes(), str(source)
    except OSError as error:
        raise ValueError(f"{sample.origin}: cannot read image {source}: {error}") from error


def question_rows(
    questions: Sequence[SynthesizedQuestion], *, seeds: Sequence[Sample], data: DataConfig
) -> list[dict[str, Any]]:
    """One dict per question with the data keys and the provenance columns (image as raw bytes)."""
    rows = []
    for q in questions:
        image, path = _image_bytes(seeds[q.seed_index])
        rows.append({
            data.id_key: q.id, data.problem_key: q.question, data.image_key: [{"bytes": image, "path": path}],
            data.answer_key: None, "source_id": q.source_id, "synthesis_mode": q.mode, "model_step": q.model_step,
            "majority_share": q.majority_share, "majority_answer": q.majority_answer,
            "seed_answer_source": q.seed_answer_source,
        })
    return rows


def _table(rows: list[dict[str, Any]], data: DataConfig):
    import pyarrow as pa

    image = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    types = {data.id_key: pa.string(), data.problem_key: pa.string(), data.image_key: image,
             data.answer_key: pa.string(), "source_id": pa.string(), "synthesis_mode": pa.string(),
             "model_step": pa.int64(), "majority_share": pa.float64(), "majority_answer": pa.string(),
             "seed_answer_source": pa.string()}
    return pa.Table.from_pylist(rows, schema=pa.schema(list(types.items())))


def _write_parquet(path: Path, rows: list[dict[str, Any]], data: DataConfig) -> None:
    import pyarrow.parquet as pq

    pq.write_table(_table(rows, data), path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]], data: DataConfig) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            images = [{"bytes": base64.b64encode(i["bytes"]).decode("ascii"), "path": i["path"]} for i in row[data.image_key]]
            handle.write(json.dumps({**row, data.image_key: images}) + "\n")


def write_result(out: str | Path, result: SynthesisResult, *, seeds: Sequence[Sample], data: DataConfig) -> Path:
    """Write the rows (atomically) and the summary next to them; returns the rows' path."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out} must end in one of {OUTPUT_SUFFIXES}")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = question_rows(result.questions, seeds=seeds, data=data)
    if out.suffix == "":
        write_dataset_folder(_table(rows, data), out, image_key=data.image_key)
        write_summary(out, result)
        return out
    tmp = out.with_name(out.name + ".tmp")
    (_write_parquet if out.suffix == ".parquet" else _write_jsonl)(tmp, rows, data)
    os.replace(tmp, out)
    write_summary(out, result)
    return out


def write_summary(out: str | Path, result: SynthesisResult) -> Path:
    path = summary_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"output": str(out), **result.summary()}, indent=2) + "\n")
    return path


__all__ = ["OUTPUT_SUFFIXES", "PROVENANCE_COLUMNS", "check_output_path", "question_rows", "summary_path", "write_result", "write_summary"]
