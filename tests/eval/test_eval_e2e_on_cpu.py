"""``mmupt eval`` end to end: a tiny Qwen2.5-VL taught to box answers, saved as a Megatron checkpoint, converted
back, served by one real vLLM engine on a MathVista-format file; the JSON report is checked against itself. Then
(slow) the HF folder on a We-Math file as published (ID + key, irregular options) with one malformed row skipped:
the steps table and the IK / IG / CM / RM measures."""

import json
import random
from pathlib import Path

import pytest
import torch

import mmupt_megatron.engines.vllm_rollout  # noqa: F401  (vLLM's CPU shims before transformers' processors)
from mmupt_megatron.algorithms import AnswerMatcher
from mmupt_megatron.algorithms.metrics import pass_at_k
from mmupt_megatron.cli import main
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.configured import image_encoder
from mmupt_megatron.data.prompts import expand_image_pads
from mmupt_megatron.eval import load_questions
from mmupt_megatron.eval.prompts import benchmark_items
from tests.tiny_models import make_tiny_qwen2_5_vl
from tests.eval import fixtures as fx

pytestmark = pytest.mark.distributed  # the checkpoint conversions spawn gloo workers
OVERRIDES = ["rollout.max_prompt_length=256", "rollout.cpu_kvcache_gib=0.5"]


def teach_to_box(model_dir: Path, data_file: Path, *, steps: int = 40, seed: int = 0) -> Path:
    """A few supervised steps on the eval prompts towards ``\\boxed{answer}`` (or a wrong one, 1 in 3), so the
    sampled answers disagree and every metric is non-trivial."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = load_config("demo").data
    questions = load_questions(data_file, "auto", data)
    items = benchmark_items(questions, data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        item = rng.choice(items)
        pixels, grid = image_encoder(data).encode(list(item.images))
        prompt_ids = tokenizer(expand_image_pads(item.prompt, grid.tolist()))["input_ids"]
        target = rng.choice([item.answer, item.answer, "A" if item.answer != "A" else "2"])
        answer_ids = tokenizer(f"\\boxed{{{target}}}<|im_end|>")["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        loss = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=labels,
                     mm_token_type_ids=(ids == image_id).int()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmupt_megatron.models.convert import hf_to_megatron

    root = tmp_path_factory.mktemp("eval_e2e")
    data_file = fx.write_mathvista(root / "mathvista")
    hf = teach_to_box(make_tiny_qwen2_5_vl(root / "hf", seed=1), data_file)
    megatron = hf_to_megatron(hf, root / "megatron")
    return root, data_file, hf, megatron


def test_prompt_length_is_checked_before_the_engine_starts(setup, capsys):
    root, data_file, hf, _ = setup
    code = main(["eval", "--model", str(hf), "--data", str(data_file), "--recipe", "demo", "rollout.max_prompt_length=20",
                 "--out", str(root / "never.json")])
    err = capsys.readouterr().err
    assert code == 2 and "prompts are longer than rollout.max_prompt_length=20 tokens" in err
    assert "testmini.json row " in err and not (root / "never.json").exists()
    # prompt + new tokens beyond the model's context: our error naming the keys, not vLLM's after its start-up
    code = main(["eval", "--model", str(hf), "--data", str(data_file), "--recipe", "demo", "rollout.max_new_tokens=4000",
                 "--out", str(root / "never.json")])
    err = capsys.readouterr().err
    assert code == 2 and "rollout.max_prompt_length=96 + rollout.max_new_tokens=4000 = 4096 tokens is more than the " \
        "model serves: 2048 (config.json text_config.max_position_embeddings" in err
    assert "Traceback" not in err and not (root / "never.json").exists()


def test_eval_of_a_megatron_checkpoint_writes_a_consistent_report(setup, capsys):
    root, data_file, _, megatron = setup
    out = root / "report.json"
    code = main(["eval", "--model", str(megatron), "--data", str(data_file), "--recipe", "demo", "--k", "4",
                 "--batch-size", "3", "--out", str(out), *OVERRIDES])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report = json.loads(out.read_text())
    assert (report["benchmark"], report["k"], report["num_questions"]) == ("mathvista", 4, 4)
    assert report["model"]["format"] == "megatron" and report["model"]["source"] == str(megatron)
    assert not Path(report["model"]["served"]).exists()  # the converted folder was temporary
    assert report["config"]["recipe"] == "demo" and report["config"]["overrides"] == OVERRIDES
    assert report["config"]["resolved"]["rollout"]["max_prompt_length"] == 256
    assert all(report["timings"][key] > 0 for key in ("load", "convert", "engine_start", "generate", "total"))

    matcher = AnswerMatcher()
    records = report["questions"]
    assert [r["id"] for r in records] == ["1", "2", "3", "4"] and records[0]["reference"] == "B"
    for r in records:
        answers, ref, s = r["sampled_answers"], r["reference"], r["scores"]
        correct = [a is not None and matcher.equal(a, ref) for a in answers]
        assert len(answers) == 4 and r["sampled_correct"] == correct
        assert s["pass@1"] == pytest.approx(sum(correct) / 4)
        assert s["pass@2"] == pytest.approx(pass_at_k(4, sum(correct), 2))
        assert s["pass@4"] == float(any(correct))
        assert s["maj@4"] == float(r["majority_answer"] is not None and matcher.equal(r["majority_answer"], ref))
        assert s["no_answer"] == sum(a is None for a in answers) / 4
        assert s["greedy"] == float(r["greedy_answer"] is not None and matcher.equal(r["greedy_answer"], ref))
    for key, value in report["metrics"].items():
        assert value == pytest.approx(sum(r["scores"][key] for r in records) / 4), key
    categories = report["by_category"]
    assert sorted(categories) == ["figure question answering", "geometry problem solving"]
    assert sum(c["questions"] for c in categories.values()) == 4
    fqa = [r for r in records if r["category"] == "figure question answering"]
    assert categories["figure question answering"]["pass@1"] == pytest.approx(sum(r["scores"]["pass@1"] for r in fqa) / len(fqa))
    # the taught model boxes its answers, and they are not all the same
    assert report["metrics"]["no_answer"] < 0.5
    assert len({a for r in records for a in r["sampled_answers"]}) > 1

    assert "| **all** | 4 |" in captured.out and "| geometry problem solving | 2 |" in captured.out
    assert f"report: {out}" in captured.out
    assert "eval: 3/4 questions" in captured.err and "eval: 4/4 questions" in captured.err


@pytest.mark.slow
def test_eval_on_wemath_as_published_skips_a_bad_row_and_reports_the_four_measures(setup, capsys):
    root, _, hf, _ = setup
    rows = fx.wemath_rows()
    rows.append({**rows[0], "ID": "2steps_2", "option": "1;2;3"})  # no option letters: skipped, counted
    data_file = fx.write_wemath(root / "wemath", rows)
    out = root / "wemath.json"
    code = main(["eval", "--model", str(hf), "--data", str(data_file), "--recipe", "demo", "--k", "2", "--out", str(out),
                 "rollout.max_prompt_length=512", "rollout.cpu_kvcache_gib=0.5", "eval.on_bad_row=skip"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report = json.loads(out.read_text())
    assert (report["benchmark"], report["num_questions"]) == ("wemath", 7)
    assert report["model"]["format"] == "hf" and report["config"]["resolved"]["eval"]["on_bad_row"] == "skip"
    loading = report["loading"]
    assert (loading["rows_read"], loading["loaded"], loading["skipped"]) == (8, 7, 1)
    assert loading["skipped_by_reason"] == {"option: options do not start with A.": 1}
    assert loading["skipped_rows"][0]["origin"] == f"{data_file} row 7 (id '2steps_2:2steps_1')"
    records = {r["id"]: r for r in report["questions"]}
    assert records["2steps_1:2steps_multi"]["options"]["F"] == "No correct answer"
    assert records["3steps_1:3steps_1"]["reference"] == "D"  # the letter, not the option whose text is "D"
    assert {name: row["questions"] for name, row in report["tables"]["steps"].items()} == {
        "one-step": 5, "three-step": 1, "two-step": 1}
    one_step = [r["scores"]["greedy"] for r in records.values() if r["groups"]["steps"] == ["one-step"]]
    assert report["tables"]["steps"]["one-step"]["greedy"] == pytest.approx(sum(one_step) / 5)
    measures = report["wemath_4d"]["greedy"]
    assert (measures["problems"], measures["incomplete"]) == (2, 0)
    assert sum(measures["counts"][key] for key in ("IK", "IG", "CM", "RM")) == 2
    multi_right = sum(records[f"{n}steps_1:{n}steps_multi"]["scores"]["greedy"] for n in (2, 3))
    assert measures["counts"]["CM"] + measures["counts"]["RM"] == multi_right
    assert "| steps | questions |" in captured.out and "We-Math four measures from greedy" in captured.out
    assert "skipped 1 of 8 rows (eval.on_bad_row=skip): option: options do not start with A.: 1" in captured.out
    print(captured.out)  # the tables, for the record (pytest -s)
