"""``synthesize`` and ``mmupt synthesize`` with a scripted engine: crafted generations hit every rejection
reason through the real pipeline; rows round-trip through our dataset loader; CLI errors; online refresh."""

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmupt_megatron.algorithms.synthesis import REASONS
from mmupt_megatron.cli import main
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.configured import open_dataset, prompt_for
from mmupt_megatron.data.dataset import ImageQuestionDataset
from mmupt_megatron.data.synthetic import generate, png_bytes
from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.synthesis.cli import synthesize_file
from mmupt_megatron.synthesis.online import PoolRefresher, pool_refresher
from mmupt_megatron.synthesis.rows import summary_path, write_result
from mmupt_megatron.trainer.checkpoint import recorded_model_step
from mmupt_megatron.synthesis.run import synthesize

SEEDS = [  # (question, answer, image number): rows 0 and 3 show the same image
    ("How many red shapes are there?", "2", 0),
    ("How many squares are there?", "1", 1),
    ("How many shapes are there?", None, 2),
    ("How many green shapes are there?", None, 0),
]
Q_BLUE = "How many blue circles are in the picture?"
Q_BLUE_2 = "How many blue circles are there in the picture?"
Q_TRIANGLES = "Count the triangles in the image."
CANDIDATES = {  # seed row -> 4 generations
    0: [f"<question>{Q_BLUE}</question>", "Let me think. <question>How many squares are", "I have no idea.",
        "<question>   </question>"],
    1: ["<question>Is there a <|image_pad|> here?</question>", "<question>Why?</question>",
        "<question>" + "word " * 100 + "</question>", "<question>how many SQUARES are there</question>"],
    2: ["<question>What colour is the largest shape?</question>", "<question>How many shapes are red or blue?</question>",
        "<question>How many shapes are < /</question>", "<question>Which shape appears most often?</question>"],
    3: [f"<question>{Q_BLUE}</question>", f"<question>{Q_BLUE_2}</question>",
        "<question>Count the circles</question> and <question>How many", f"<question>{Q_TRIANGLES}</question>"],
}
ANSWERS = {  # question -> 4 answers
    Q_BLUE: ["\\boxed{2}"] * 3 + ["\\boxed{3}"],
    Q_BLUE_2: ["\\boxed{2}"] * 3 + ["\\boxed{3}"],
    Q_TRIANGLES: ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{3}"],
    "What colour is the largest shape?": ["red", "blue", "so \\boxed{red}", "no idea"],
    "How many shapes are red or blue?": ["\\boxed{3}"] * 4,
    "Which shape appears most often?": ["\\boxed{circle}", "\\boxed{square}", "\\boxed{triangle}", "none"],
    "How many shapes are there?": ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "x"],  # seed 2: majority 4
    "How many green shapes are there?": ["no"] * 4,  # seed 3: nobody answers
}
EXPECTED = {"candidates": 16, "kept": 3, "no_question": 1, "unclosed": 2, "empty": 1, "special_tokens": 1,
            "tag_fragment": 1, "too_short": 1, "too_long": 1, "repeats_seed": 1, "near_duplicate": 1, "unanswerable": 1,
            "agreement_band": 2}
OVERRIDES = ["synthesis.candidates_per_seed=4", "synthesis.answer_n=4", "synthesis.min_words=3",
             "synthesis.max_words=40", "synthesis.agreement_low=0.3", "synthesis.agreement_high=0.9"]


class ScriptedEngine:
    """Answers synthesis prompts from ``candidates[global request index]`` and answer prompts by question."""

    def __init__(self, candidates, answers, data):
        self.candidates, self.answers, self.data = candidates, answers, data
        self.calls = []  # (kind, prompts, spec)

    def generate(self, requests, spec):
        out = []
        kind = "question" if "</question>" in requests[0].prompt else "answer"
        self.calls.append((kind, [r.prompt for r in requests], spec, [r.group_id for r in requests]))
        for index, request in enumerate(requests):
            assert len(request.images) == 1 and request.images[0].size == (84, 84)
            if kind == "question":
                texts = self.candidates[request.group_id]
            else:
                matches = [q for q in self.answers if prompt_for(q, self.data) == request.prompt]
                assert len(matches) == 1, f"unexpected answer prompt {request.prompt!r}"
                texts = self.answers[matches[0]]
            assert len(texts) == spec.n
            out += [Rollout(group_id=request.group_id, prompt_index=index, sample_index=k, prompt_token_ids=[1],
                            response_token_ids=[2], response_logprobs=[-0.1], text=t, finish_reason="stop")
                    for k, t in enumerate(texts)]
        return out


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    images = [png_bytes(e.image) for e in generate(3, seed=0)]
    table = pa.table({
        "id": [f"s{i}" for i in range(len(SEEDS))],
        "problem": [q for q, _, _ in SEEDS],
        "images": [[{"bytes": images[n], "path": None}] for _, _, n in SEEDS],
        "answer": [a for _, a, _ in SEEDS],
    })
    pq.write_table(table, root / "seeds.parquet")
    return root / "seeds.parquet"


@pytest.fixture
def cfg():
    return load_config("demo", OVERRIDES)


def run(cfg, seed_file, **kwargs):
    dataset = open_dataset([str(seed_file)], cfg.data)
    engine = ScriptedEngine(CANDIDATES, ANSWERS, cfg.data)
    result = synthesize(engine.generate, dataset.samples, synthesis=cfg.synthesis, data=cfg.data,
                        rollout=cfg.rollout, **kwargs)
    return result, engine, dataset


def test_every_reason_counted_once_through_the_pipeline(cfg, seed_file):
    result, engine, _ = run(cfg, seed_file, model_step=12)
    assert result.counts == EXPECTED
    assert sum(result.counts[r] for r in REASONS) + result.counts["kept"] == result.counts["candidates"]
    assert [(q.source_id, q.question) for q in result.questions] == [("s0", Q_BLUE), ("s3", Q_BLUE_2), ("s3", Q_TRIANGLES)]
    first = result.questions[0]
    assert first.id == "s0#in-context-0@12" and first.mode == "in-context" and first.model_step == 12
    assert first.majority_share == 0.75 and first.majority_answer == "2" and first.seed_answer_source == "data"
    assert result.questions[2].majority_share == 0.5
    assert result.seed_answer_sources == {"data": 2, "majority": 1, "none": 1}
    assert result.examples["unclosed"] == ["Let me think. <question>How many squares are",
                                           "<question>Count the circles</question> and <question>How many"]
    # the prompts showed the data's answer, the policy's majority answer, or said it is not given
    question_prompts = next(p for kind, p, _, _ in engine.calls if kind == "question")
    assert "Answer: 2\n" in question_prompts[0] and "Answer: 4\n" in question_prompts[2]
    assert "Answer:" not in question_prompts[3] and "not given" in question_prompts[3]
    # only the seed rows without a data answer were voted on, and only surviving questions were answered
    answered = [p for kind, prompts, _, _ in engine.calls if kind == "answer" for p in prompts]
    assert len(answered) == 2 + 6
    assert "12" in result.describe() and "unclosed 2" in result.describe()


def test_results_do_not_depend_on_batching_and_each_request_has_its_own_seed(cfg, seed_file):
    one, engine_one, _ = run(replace(cfg, synthesis=replace(cfg.synthesis, batch_size=1)), seed_file)
    many, engine_many, _ = run(cfg, seed_file)
    assert one.questions == many.questions and one.counts == many.counts
    assert len(engine_one.calls) > len(engine_many.calls)
    bases = []
    for engine in (engine_one, engine_many):
        by_stage = {}
        for kind, _, spec, group_ids in engine.calls:
            # a call starting at global request g is seeded base + g, so request i gets base + g + i
            by_stage.setdefault(kind, set()).add(spec.seed - group_ids[0])
        bases.append(by_stage)
    assert bases[0] == bases[1] and len(bases[0]["question"]) == 1 and len(bases[0]["answer"]) == 2
    seeds_one = sorted(spec.seed for kind, _, spec, _ in engine_one.calls if kind == "question")
    assert seeds_one == [cfg.synthesis.seed + i for i in range(len(SEEDS))]


def test_direct_mode_and_dedup_scope(cfg, seed_file):
    same = "<question>How many shapes touch the border?</question>"
    candidates = {i: [same, same, "x", "y"] for i in range(len(SEEDS))}
    answers = {"How many shapes touch the border?": ["\\boxed{1}"] * 3 + ["\\boxed{2}"]}
    dataset = open_dataset([str(seed_file)], cfg.data)
    kept = {}
    for scope in ("image", "global"):
        c = replace(cfg, synthesis=replace(cfg.synthesis, mode="direct", dedup_scope=scope))
        engine = ScriptedEngine(candidates, answers, c.data)
        result = synthesize(engine.generate, dataset.samples, synthesis=c.synthesis, data=c.data, rollout=c.rollout)
        prompts = [p for kind, ps, _, _ in engine.calls if kind == "question" for p in ps]
        assert len(prompts) == 4 and not any(q in p for q, _, _ in SEEDS for p in prompts)
        assert result.seed_answer_sources == {} and all(q.seed_answer_source is None for q in result.questions)
        kept[scope] = [q.source_id for q in result.questions]
    assert kept["image"] == ["s0", "s1", "s2"]  # s3 shows s0's image
    assert kept["global"] == ["s0"]


def test_rows_round_trip_through_the_dataset_loader(cfg, seed_file, tmp_path):
    result, _, dataset = run(cfg, seed_file, model_step=12)
    for name in ("out.parquet", "out.jsonl"):
        path = write_result(tmp_path / name, result, seeds=dataset.samples, data=cfg.data)
        loaded = ImageQuestionDataset(path)
        assert [s.question for s in loaded.samples] == [q.question for q in result.questions]
        assert all(s.answer is None for s in loaded.samples)
        assert [s.id for s in loaded.samples] == [q.id for q in result.questions]
        # the image is the seed row's, byte for byte
        seeds = {s.id: s for s in dataset.samples}
        for sample, q in zip(loaded.samples, result.questions):
            assert sample.image_source == seeds[q.source_id].image_source
            assert loaded[0][1].size == (84, 84)
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["source_id"] == ["s0", "s3", "s3"] and set(table["synthesis_mode"]) == {"in-context"}
    assert table["model_step"] == [12, 12, 12] and table["majority_share"] == [0.75, 0.75, 0.5]
    assert table["answer"] == [None] * 3 and table["seed_answer_source"] == ["data", "none", "none"]
    summary = json.loads(summary_path(tmp_path / "out.parquet").read_text())
    assert summary["counts"] == EXPECTED and summary["mode"] == "in-context" and summary["model_step"] == 12


@pytest.fixture
def model_dir(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "hf").mkdir(parents=True)
    (run_dir / "hf" / "config.json").write_text("{}")
    checkpoint = run_dir / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "sampler": {}}))
    return run_dir / "hf"


def test_model_step_comes_from_the_run_checkpoint(cfg, seed_file, model_dir, tmp_path):
    assert recorded_model_step(model_dir) == 5  # steps 0..4 done
    assert recorded_model_step(tmp_path / "nowhere") is None
    engine = ScriptedEngine(CANDIDATES, ANSWERS, cfg.data)
    c = replace(cfg, synthesis=replace(cfg.synthesis, model_step=99))
    result = synthesize_file(source=seed_file, out=tmp_path / "o.parquet", model=model_dir, cfg=c, engine=engine,
                             progress=None)
    assert {q.model_step for q in result.questions} == {5}
    assert pq.read_table(tmp_path / "o.parquet").to_pydict()["model_step"] == [5, 5, 5]


def test_nothing_kept_is_an_error_with_a_summary(cfg, seed_file, model_dir, tmp_path):
    engine = ScriptedEngine({i: ["<question>never closed"] * 4 for i in range(4)}, ANSWERS, cfg.data)
    with pytest.raises(ValueError, match="no synthesized question passed"):
        synthesize_file(source=seed_file, out=tmp_path / "o.parquet", model=model_dir, cfg=cfg, engine=engine,
                        progress=None)
    assert not (tmp_path / "o.parquet").exists()
    assert json.loads(summary_path(tmp_path / "o.parquet").read_text())["counts"]["unclosed"] == 16


def cli(capsys, *args):
    code = main(["synthesize", *args])
    return code, capsys.readouterr().err


def test_cli_refuses_to_overwrite_and_names_bad_rows(seed_file, model_dir, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    out.write_text("precious")
    base = ["--input", str(seed_file), "--model", str(model_dir), "--recipe", "demo", "--mode", "direct"]
    code, err = cli(capsys, *base, "--out", str(out))
    assert code == 2 and "exists; pass --force" in err and out.read_text() == "precious"
    code, err = cli(capsys, *base, "--out", str(tmp_path / "out.csv"))
    assert code == 2 and "must end in one of" in err
    code, err = cli(capsys, "--input", str(seed_file), "--model", str(tmp_path), "--recipe", "demo", "--mode",
                    "direct", "--out", str(tmp_path / "x.parquet"))
    assert code == 2 and "not a Hugging Face folder" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "ok?", "images": str(tmp_path / "missing.png")}) + "\n")
    code, err = cli(capsys, "--input", str(bad), "--model", str(model_dir), "--recipe", "demo", "--mode", "direct",
                    "--out", str(tmp_path / "y.parquet"))
    assert code == 2 and "bad.jsonl row 0" in err and "not found" in err
    twice = tmp_path / "twice.parquet"
    pq.write_table(pq.read_table(seed_file).set_column(0, "id", pa.array(["a", "b", "a", "c"])), twice)
    code, err = cli(capsys, "--input", str(twice), "--model", str(model_dir), "--recipe", "demo", "--mode", "direct",
                    "--out", str(tmp_path / "z.parquet"))
    assert code == 2 and "twice.parquet row 2: id 'a' was already used by" in err and "row 0" in err
    code, err = cli(capsys, *base, "--out", str(tmp_path / "w.parquet"), "synthesis.answer_n=1")
    assert code == 2 and "synthesis.answer_n" in err


def test_online_refresh_replaces_part_of_the_pool_and_restores_it(seed_file, tmp_path):
    cfg = load_config("demo", ["synthesis.refresh_every=2", "synthesis.refresh_fraction=0.5", "synthesis.answer_n=4",
                               "synthesis.candidates_per_seed=2", "synthesis.mode=direct"])

    def fresh():
        dataset = open_dataset([str(seed_file)], cfg.data)
        candidates = {i: [f"<question>How many shapes are in row {i} now?</question>",
                          f"<question>Which colour is rarest in part {i} ?</question>"] for i in range(4)}
        answers = {f"How many shapes are in row {i} now?": ["\\boxed{1}"] * 3 + ["\\boxed{2}"] for i in range(4)}
        answers |= {f"Which colour is rarest in part {i} ?": ["\\boxed{red}"] * 2 + ["no"] * 2 for i in range(4)}
        engine = ScriptedEngine(candidates, answers, cfg.data)
        return dataset, PoolRefresher(dataset.samples, cfg=cfg, generate=engine.generate, out_dir=tmp_path / "run")

    dataset, refresher = fresh()
    original = list(dataset.samples)
    assert refresher.before_step(0) == {} and refresher.before_step(1) == {}
    metrics = refresher.before_step(2)
    assert metrics["synthesis/replaced"] == 2.0 and metrics["synthesis/kept"] == 4.0
    assert metrics["synthesis/pool_synthetic"] == 0.5
    changed = [i for i, (a, b) in enumerate(zip(original, dataset.samples)) if a != b]
    assert len(changed) == 2 and len(dataset.samples) == len(original)
    seeds = {s.id: s for s in original}
    for i in changed:
        sample = dataset.samples[i]
        assert sample.answer is None and sample.id.endswith("@2") and "synthesized before step 2" in sample.origin
        assert sample.image_source == seeds[sample.id.split("#")[0]].image_source
        assert dataset[i][1].size == (84, 84)  # the trainer reads it like any row
    assert (tmp_path / "run" / "synthesis" / "pool_step_000002.json").is_file()
    refreshed = list(dataset.samples)

    # a resumed trainer: before the refresh nothing changes, after it the same pool comes back
    dataset, refresher = fresh()
    assert refresher.restore(1) is None and dataset.samples == original
    assert refresher.restore(3) == 2 and dataset.samples == refreshed
    # the same seeds and step give the same refresh
    dataset, refresher = fresh()
    refresher.before_step(2)
    assert dataset.samples == refreshed
    # other data under the same run: refused, not silently mixed
    dataset, refresher = fresh()
    dataset.samples.reverse()
    with pytest.raises(ValueError, match="data changed"):
        PoolRefresher(dataset.samples, cfg=cfg, generate=None, out_dir=tmp_path / "run").restore(3)
    with pytest.raises(ValueError, match="refresh_every"):
        PoolRefresher(dataset.samples, cfg=load_config("demo"), generate=None, out_dir=tmp_path)


def test_trainer_hook_is_a_no_op_when_off_and_checks_the_engine_budget(tmp_path):
    off = pool_refresher(load_config("demo"), [], cluster=None, out_dir=tmp_path)
    assert off.before_step(10) == {} and off.restore(10) is None
    with pytest.raises(ValueError, match="raise rollout.max_prompt_length"):
        pool_refresher(load_config("demo", ["synthesis.refresh_every=5"]), [], cluster=None, out_dir=tmp_path)
    on = load_config("demo_synthetic", ["synthesis.refresh_every=5"])
    assert on.synthesis.max_prompt_length + on.synthesis.max_new_tokens <= (
        on.rollout.max_prompt_length + on.rollout.max_new_tokens)  # the recipe's online option fits its engine


def test_max_seeds_uses_only_the_first_rows(cfg, seed_file, model_dir, tmp_path):
    engine = ScriptedEngine(CANDIDATES, ANSWERS, cfg.data)
    full = synthesize_file(source=seed_file, out=tmp_path / "all.parquet", model=model_dir, cfg=cfg, engine=engine,
                           progress=None)
    seeds_used = sorted({q.source_id for q in full.questions})
    assert len(seeds_used) > 1
    # the first seed row that yields questions, and every row before it
    rows = [r["id"] for r in pq.read_table(seed_file).to_pylist()]
    limit = rows.index(seeds_used[0]) + 1
    c = replace(cfg, synthesis=replace(cfg.synthesis, max_seeds=limit))
    engine = ScriptedEngine(CANDIDATES, ANSWERS, cfg.data)
    first = synthesize_file(source=seed_file, out=tmp_path / "one.parquet", model=model_dir, cfg=c, engine=engine,
                            progress=None)
    assert {q.source_id for q in first.questions} == {seeds_used[0]}
    assert first.counts["candidates"] == limit * cfg.synthesis.candidates_per_seed
