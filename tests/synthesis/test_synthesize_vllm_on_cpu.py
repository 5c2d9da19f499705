"""``mmupt synthesize`` end to end on CPU: a tiny Qwen2.5-VL taught the question format, served by a real vLLM
engine, both modes; the output is read back by our dataset loader; an online pool refresh with that engine."""

import json

import pyarrow.parquet as pq
import pytest

from mmupt_megatron.algorithms.synthesis import REASONS
from mmupt_megatron.cli import main
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.configured import open_dataset
from mmupt_megatron.data.dataset import ImageQuestionDataset
from mmupt_megatron.data.synthetic import write_splits as make_world
from mmupt_megatron.synthesis import cli as synthesis_cli
from mmupt_megatron.synthesis.online import PoolRefresher
from mmupt_megatron.synthesis.rows import summary_path
from tests.synthesis.question_model import make_question_model

pytestmark = pytest.mark.slow  # a real vLLM engine: ~10 s to start on 2 cores

OVERRIDES = ["synthesis.candidates_per_seed=4", "synthesis.answer_n=4", "synthesis.max_new_tokens=24",
             "synthesis.max_prompt_length=256", "synthesis.model_step=7", "rollout.max_new_tokens=12"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmupt_megatron.engines.vllm_rollout import VLLMRolloutEngine

    root = tmp_path_factory.mktemp("synthesis")
    data = load_config("demo").data
    model = make_question_model(root / "model", data=data)
    files = make_world(root / "data", num_train=6, num_test=1, seed=0)
    engine = VLLMRolloutEngine(model, max_model_len=320, cpu_kvcache_gib=0.5, seed=0)
    yield engine, model, files["train"], root
    engine.close()


class _Borrowed:
    """The module's engine, lent to the CLI (which closes the engines it opens)."""

    def __init__(self, engine):
        self.generate = engine.generate

    def close(self):
        pass


@pytest.mark.parametrize("mode, extra", [("in-context", ["synthesis.seed_answer=majority"]), ("direct", [])])
def test_mmupt_synthesize_both_modes(setup, monkeypatch, capsys, mode, extra):
    engine, model, train, root = setup
    monkeypatch.setattr(synthesis_cli, "open_engine", lambda model_dir, cfg: _Borrowed(engine))
    out = root / f"{mode}.parquet"
    code = main(["synthesize", "--mode", mode, "--input", str(train), "--out", str(out), "--model", str(model),
                 "--recipe", "demo", "--force", *OVERRIDES, *extra])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "synthesize: questions 6/6" in printed and "synthesized" in printed
    summary = json.loads(summary_path(out).read_text())
    counts = summary["counts"]
    assert counts["candidates"] == 6 * 4 and counts["kept"] + sum(counts[r] for r in REASONS) == counts["candidates"]
    assert counts["kept"] > 0 and counts["unclosed"] > 0  # the model leaves some questions open: counted, not raised
    if mode == "in-context":
        assert sum(summary["seed_answer_sources"].values()) == 6 and "data" not in summary["seed_answer_sources"]

    loaded = ImageQuestionDataset(out)  # the loader mmupt train uses
    seeds = {s.id: s for s in open_dataset([str(train)], load_config("demo").data).samples}
    assert len(loaded) == counts["kept"] and all(s.answer is None for s in loaded.samples)
    table = pq.read_table(out).to_pydict()
    assert set(table["synthesis_mode"]) == {mode} and set(table["model_step"]) == {7}
    assert set(table["source_id"]) <= set(seeds)
    assert all(0.0 < share <= 1.0 for share in table["majority_share"])
    for sample, source in zip(loaded.samples, table["source_id"]):
        assert sample.image_source == seeds[source].image_source and sample.question != seeds[source].question
    assert loaded[0][1].size == (84, 84)


def test_online_refresh_with_the_real_engine(setup, tmp_path):
    engine, _, train, _ = setup
    cfg = load_config("demo", [*OVERRIDES, "synthesis.mode=direct", "synthesis.refresh_every=3",
                               "synthesis.refresh_fraction=1.0"])
    dataset = open_dataset([str(train)], cfg.data)
    original = list(dataset.samples)
    refresher = PoolRefresher(dataset.samples, cfg=cfg, generate=engine.generate, out_dir=tmp_path)
    assert refresher.before_step(2) == {}
    metrics = refresher.before_step(3)
    changed = [i for i, (a, b) in enumerate(zip(original, dataset.samples)) if a != b]
    assert 0 < metrics["synthesis/replaced"] == len(changed) <= 6
    assert metrics["synthesis/candidates"] == 6 * 4 and metrics["time/synthesis"] > 0
    for i in changed:
        sample, image = dataset[i]
        assert sample.id.endswith("@3") and sample.answer is None and image.size == (84, 84)
