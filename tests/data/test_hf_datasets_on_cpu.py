"""Hugging Face datasets as data sources: the same rows as parquet give the same samples in the same order to the
trainer (sampler batches, prompts, fitted images), the held-out evaluation and ``mmupt eval``; from a
``save_to_disk`` folder (images as ``datasets.Image`` features or as paths), a dataset repository folder and the
local hub cache (offline, in a fresh process with ``HF_DATASETS_OFFLINE=1``); clear errors for a missing dataset
and a wrong split; ``mmupt synthesize`` output as a dataset folder."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmupt_megatron.config import DataConfig
from mmupt_megatron.data.configured import image_encoder, open_dataset, prompt_for
from mmupt_megatron.eval.evaluator import held_out_items
from mmupt_megatron.data.sampler import ResumableSampler

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "mmupt-test/tiny_shapes"
DATA = DataConfig(min_pixels=28 * 28, max_pixels=56 * 56, on_bad_row="skip")


def _png(seed: int, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(prefix: str, n: int, offset: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "problem": f"How many shapes in picture {prefix}{i}?", "answer": str(i % 4),
             "images": [{"bytes": _png(offset + i, 28 + 14 * (i % 3), 42), "path": None}]} for i in range(n)]


TRAIN, TEST = _rows("tr", 7, 0), _rows("te", 3, 100)


def trace(files, data: DataConfig = DATA) -> dict:
    """What training and evaluation see: rows, 3 sampler batches (prompt + fitted pixels), held-out items."""
    dataset = open_dataset([str(f) for f in files], data)
    sampler, encoder = ResumableSampler(len(dataset), seed=3), image_encoder(data)
    batches = []
    for _ in range(3):
        pairs = [dataset[i] for i in sampler.next_batch(4)]
        batches.append([(prompt_for(s.question, data), _digest(encoder.fit(image))) for s, image in pairs])
    return {"rows": [[s.id, s.question, s.answer] for s in dataset.samples], "batches": batches,
            "skipped": dataset.skipped.total}


def eval_trace(files, data: DataConfig = DATA) -> list:
    return [[item.prompt, [_digest(i) for i in item.images], item.answer] for item in held_out_items([str(f) for f in files], data)]


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes() + repr(image.size).encode()).hexdigest()[:16]


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """datasets writes Arrow caches (repository folders, hub ids) under HF_DATASETS_CACHE: a temporary one here,
    offline (a test must never reach for the hub)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same rows as parquet files, save_to_disk folders (Image features; path strings) and a repository folder."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    (root / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(TRAIN), root / "parquet" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(TEST), root / "parquet" / "test.parquet")
    features = datasets.Features({"id": datasets.Value("string"), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    train = datasets.Dataset.from_list(TRAIN, features=features)
    test = datasets.Dataset.from_list(TEST, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved"))
    # images as relative paths inside the folder (a plain string column)
    by_path = root / "saved_paths"
    datasets.Dataset.from_list([{**r, "images": f"imgs/{r['id']}.png"} for r in TRAIN]).save_to_disk(str(by_path))
    (by_path / "imgs").mkdir()
    for r in TRAIN:
        (by_path / "imgs" / f"{r['id']}.png").write_bytes(r["images"][0]["bytes"])
    repo = root / "repo"
    (repo / "data").mkdir(parents=True)
    train.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# tiny shapes\nCounting questions about shapes.\n")
    return root


def place_in_hub_cache(cache: Path, parquet_dir: Path) -> None:
    """Lay ``HUB_ID`` out in a datasets cache as ``load_dataset(HUB_ID)`` leaves it (its Arrow files and
    dataset_info.json under NAMESPACE___NAME/default/0.0.0/REVISION), with datasets' own parquet builder."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = HUB_ID.split("/")
    files = DataFilesDict.from_patterns({"train": ["train.parquet"], "test": ["test.parquet"]}, base_path=str(parquet_dir))
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", config_id="default",
                      hash="0123456789abcdef", data_files=files)
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")


def test_save_to_disk_folder_trains_and_evaluates_like_parquet(sources):
    reference = trace([sources / "parquet" / "train.parquet"])
    assert len(reference["rows"]) == 7 and reference["skipped"] == 0
    assert trace([sources / "saved"]) == reference  # DatasetDict: train by default
    assert trace([f"{sources / 'saved'}@train"]) == reference
    assert trace([sources / "saved" / "train"]) == reference  # one saved split
    assert trace([sources / "saved_paths"]) == reference  # images as paths relative to the folder
    assert eval_trace([f"{sources / 'saved'}@test"]) == eval_trace([sources / "parquet" / "test.parquet"])
    dataset = open_dataset([f"{sources / 'saved'}@test"], DATA)
    assert dataset.samples[1].origin == f"{sources / 'saved'}@test row 1"


def test_repository_folder_trains_and_evaluates_like_parquet(sources):
    assert trace([sources / "repo"]) == trace([sources / "parquet" / "train.parquet"])
    assert eval_trace([f"{sources / 'repo'}@test"]) == eval_trace([sources / "parquet" / "test.parquet"])


def test_hub_cache_dataset_trains_and_evaluates_like_parquet(sources, private_hf_cache):
    place_in_hub_cache(private_hf_cache / "datasets", sources / "parquet")
    assert trace([HUB_ID]) == trace([sources / "parquet" / "train.parquet"])
    assert eval_trace([f"{HUB_ID}@test"]) == eval_trace([sources / "parquet" / "test.parquet"])
    # a list mixing a hub dataset and a file: rows in the order given
    mixed = open_dataset([f"{HUB_ID}@test", str(sources / "parquet" / "train.parquet")], DATA)
    assert [s.id for s in mixed.samples] == [r["id"] for r in TEST + TRAIN]


@pytest.mark.slow
def test_offline_process_loads_the_hub_cache(sources, tmp_path):
    """A fresh process with HF_DATASETS_OFFLINE=1 and HF_HOME at the cache: the same samples as the parquet."""
    home = tmp_path / "home"
    place_in_hub_cache(home / "datasets", sources / "parquet")
    script = ("import json, sys; from tests.data.test_hf_datasets_on_cpu import trace, eval_trace; "
              "print(json.dumps([trace([sys.argv[1]]), eval_trace([sys.argv[1] + '@test'])]))")
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script, HUB_ID], capture_output=True, text=True, env=env, check=False,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train, held_out = json.loads(done.stdout.strip().splitlines()[-1])
    assert train == json.loads(json.dumps(trace([sources / "parquet" / "train.parquet"])))
    assert held_out == json.loads(json.dumps(eval_trace([sources / "parquet" / "test.parquet"])))


def test_missing_dataset_names_it_the_split_and_where_it_looked(private_hf_cache):
    with pytest.raises(ValueError, match=r"Hugging Face dataset 'someone/not_cached' \(split 'test'\) not found: "
                                         r"no local path .*offline.*looked in " + str(private_hf_cache / "datasets")):
        open_dataset(["someone/not_cached@test"], DATA)
    with pytest.raises(ValueError, match=r"'nothing_here' \(split 'train'\) not found"):
        open_dataset(["nothing_here"], DATA)
    # a missing data file stays a missing path, not a hub lookup
    with pytest.raises(ValueError, match=r"data path not found: missing\.parquet"):
        open_dataset(["missing.parquet"], DATA)


def test_wrong_split_names_the_splits_there_are(sources, private_hf_cache):
    place_in_hub_cache(private_hf_cache / "datasets", sources / "parquet")
    with pytest.raises(ValueError, match=rf"{HUB_ID}: no split 'validation'; its splits are \['train', 'test'\]"):
        open_dataset([f"{HUB_ID}@validation"], DATA)
    with pytest.raises(ValueError, match=r"saved: no split 'tset'; its splits are \['train', 'test'\]"):
        open_dataset([f"{sources / 'saved'}@tset"], DATA)
    with pytest.raises(ValueError, match=r"repo: no split 'dev'"):
        open_dataset([f"{sources / 'repo'}@dev"], DATA)
    with pytest.raises(ValueError, match=r"saved/train: no split 'test'; it holds one dataset; give .* without @SPLIT"):
        open_dataset([f"{sources / 'saved' / 'train'}@test"], DATA)
    with pytest.raises(ValueError, match=r"@test names a split, but .* is not a Hugging Face dataset folder"):
        open_dataset([f"{sources / 'parquet'}@test"], DATA)


def test_bad_rows_and_column_keys_work_as_for_parquet(tmp_path):
    import datasets

    rows = [{"q": "Fine?", "pic": _png(1, 28, 28), "a": "1"}, {"q": "", "pic": _png(2, 28, 28), "a": "2"},
            {"q": "Thin?", "pic": _png(3, 600, 2), "a": "3"}, {"q": "Broken?", "pic": b"not an image", "a": "4"}]
    features = datasets.Features({"q": datasets.Value("string"), "pic": datasets.Value("binary"), "a": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "bad"))
    keys = {"problem_key": "q", "image_key": "pic", "answer_key": "a"}
    with pytest.raises(ValueError, match=r"bad row 1: empty or missing question"):
        open_dataset([str(tmp_path / "bad")], DataConfig(**keys))
    skipping = open_dataset([str(tmp_path / "bad")], DataConfig(**keys, on_bad_row="skip"))
    assert [s.answer for s in skipping.samples] == ["1"]
    assert skipping.skipped.counts == {"empty question": 1, "extreme aspect ratio": 1, "bad image": 1}
    with pytest.raises(ValueError, match=r"bad: missing column\(s\) \['problem', 'images'\]; columns are \['q', 'pic', 'a'\]"):
        open_dataset([str(tmp_path / "bad")], DataConfig())


def test_mmupt_eval_loader_reads_hub_datasets(sources, private_hf_cache):
    from mmupt_megatron.eval.benchmarks import detect_benchmark, load_questions

    place_in_hub_cache(private_hf_cache / "datasets", sources / "parquet")
    data = DataConfig()
    expected = load_questions(sources / "parquet" / "test.parquet", "generic", data)
    for spec in (f"{HUB_ID}@test", f"{sources / 'saved'}@test", f"{sources / 'repo'}@test"):
        assert detect_benchmark(Path(spec), data) == "generic"
        got = load_questions(spec, "auto", data)
        assert [(q.id, q.question, q.answer, q.image_size) for q in got] == \
            [(q.id, q.question, q.answer, q.image_size) for q in expected]


def test_synthesized_rows_written_as_a_dataset_folder(sources, tmp_path):
    import datasets

    from mmupt_megatron.synthesis.rows import check_output_path, summary_path, write_result
    from mmupt_megatron.synthesis.run import SynthesisResult, SynthesizedQuestion

    seeds = open_dataset([str(sources / "parquet" / "train.parquet")], DATA).samples
    questions = [SynthesizedQuestion(id=f"syn{i}", question=f"What colour is shape {i}?", seed_index=i,
                                     source_id=seeds[i].id, mode="direct", model_step=3, majority_share=0.75,
                                     majority_answer="red", seed_answer_source=None) for i in (4, 1)]
    result = SynthesisResult(mode="direct", model_step=3, num_seeds=7, questions=questions,
                             counts={"candidates": 2, "kept": 2})
    out = check_output_path(tmp_path / "synthetic", force=False)
    write_result(out, result, seeds=seeds, data=DATA)
    shared = datasets.load_from_disk(str(out))
    assert isinstance(shared.features["images"], datasets.List) and isinstance(shared.features["images"].feature, datasets.Image)
    assert shared["source_id"] == ["tr4", "tr1"] and shared["answer"] == [None, None]
    assert np.array_equal(np.asarray(shared[0]["images"][0].convert("RGB")), np.asarray(open_dataset(
        [str(sources / "parquet" / "train.parquet")], DATA)[4][1]))
    reread = open_dataset([str(out)], DATA)
    assert [(s.id, s.question) for s in reread.samples] == [("syn4", "What colour is shape 4?"), ("syn1", "What colour is shape 1?")]
    assert json.loads(summary_path(out).read_text())["counts"]["kept"] == 2
    with pytest.raises(ValueError, match="exists; pass --force"):
        check_output_path(out, force=False)
    write_result(check_output_path(out, force=True), result, seeds=seeds, data=DATA)  # replaces its own folder
    assert len(datasets.load_from_disk(str(out))) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a dataset folder written by save_to_disk; refusing"):
        check_output_path(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"must end in one of \('\.parquet', '\.jsonl'\), or have no suffix"):
        check_output_path(tmp_path / "out.csv", force=False)
