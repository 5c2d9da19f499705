"""Outputs never land on inputs, for every command that writes: an eval report that is the --data file (which
it overwrote, exit 0) or the --model folder, or lies in the --data / --images folder; a synthesize OUT that is,
holds or lies in --input, or is or holds --model (--force too; a new file in a model folder harms nothing); a
training whose trainer.output_dir (checkpoints, plots, the hf export) is, holds or lies in model.path or a data
file. Each is refused before any work, naming both paths, and the input is left byte for byte. (``mmupt
convert``: tests/reliability/test_convert_outputs_on_cpu.py.)"""

import re

import pytest

from mmupt_megatron.cli import main
from mmupt_megatron.output_dirs import LOCK_FILE, OWNER_FILE, check_run_apart


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.fixture
def inputs(tmp_path):
    """A benchmark file in a data folder, an image folder, a model folder: what the commands read."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "mathvista.json").write_text('[{"pid": "1", "question": "2+2?", "answer": "4"}]\n')
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "seeds.parquet").write_bytes(b"PAR1 seed rows")
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


# -- mmupt eval -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "extra", "message"), [
    ("bench/mathvista.json", [], r"--out {o} is the input --data {d} itself: choose another --out"),
    ("bench/sub/report.json", ["--data", "{t}/bench"], r"--out {o} lies inside the input --data {t}/bench"),
    ("images/report.json", ["--images", "{t}/images"], r"--out {o} lies inside the input --images {t}/images"),
    ("model", [], r"--out {o} is the input --model {t}/model itself"),
])
def test_eval_report_never_lands_on_its_inputs(inputs, capsys, out, extra, message):
    t, data = inputs, inputs / "bench" / "mathvista.json"
    before = snapshot(t)
    argv = ["eval", "--model", str(t / "model"), "--data", str(data), "--out", str(t / out),
            *[a.format(t=t) for a in extra]]
    code, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert re.search(message.format(o=re.escape(str(t / out)), d=re.escape(str(data)), t=re.escape(str(t))), err), err
    assert snapshot(t) == before  # the benchmark file is not overwritten, nothing is added


def test_eval_default_report_inside_a_data_folder_is_refused(inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    (inputs / "runs" / "eval").mkdir(parents=True)
    (inputs / "runs" / "eval" / "q.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    code, err = run(capsys, "eval", "--model", "model", "--data", "runs/eval", "--benchmark", "generic")
    assert code == 2
    assert "--out runs/eval/generic_eval.json lies inside the input --data runs/eval" in err
    assert sorted(p.name for p in (inputs / "runs" / "eval").iterdir()) == ["q.jsonl"]


# -- mmupt synthesize --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "source", "message"), [
    ("seeds.parquet", "seeds.parquet", r"--out {o} is the input --input {s} itself"),
    ("bench/synthetic.jsonl", "bench", r"--out {o} lies inside the input --input {s}"),
    ("bench", "bench@train", r"--out {o} is the input --input {s} itself"),  # a dataset folder's split
    ("model", "seeds.parquet", r"--out {o} is the input --model {t}/model itself"),
    ("", "seeds.parquet", r"--out {o} contains the input --input {s}"),  # a dataset folder around the inputs
])
def test_synthesize_never_writes_over_its_input_even_with_force(inputs, capsys, out, source, message):
    t = inputs
    before = snapshot(t)
    code, err = run(capsys, "synthesize", "--mode", "direct", "--input", f"{t}/{source}", "--out", str(t / out),
                    "--model", str(t / "model"), "--recipe", "demo", "--force")
    assert code == 2 and "Traceback" not in err
    assert re.search(message.format(o=re.escape(str(t / out)), s=re.escape(f"{t}/{source}"), t=re.escape(str(t))), err), err
    assert snapshot(t) == before


# -- mmupt train: checkpoints, plots and the hf export ---------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.tiny_models import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("apart") / "model", seed=0)


def trainer(model, out, *extra):
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.trainer.loop import Trainer

    return Trainer(load_config("demo", [f"model.path={model}", f"trainer.output_dir={out}", *extra]))


def test_training_into_the_model_folder_is_refused_before_anything_is_written(model):
    import ray

    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"trainer.output_dir={model} is the input model.path={model}: the run would "
                                         r"write its checkpoints, plots and hf export there"):
        trainer(model, model)
    with pytest.raises(ValueError, match=rf"trainer.output_dir={model / 'run'} lies inside the input model.path"):
        trainer(model, model / "run")
    assert not ray.is_initialized()
    assert snapshot(model) == before  # no ownership marker, no lock, no run folder
    assert not (model / OWNER_FILE).exists() and not (model / LOCK_FILE).exists()


def test_a_model_or_data_in_what_the_run_replaces_is_refused(model, tmp_path):
    out = tmp_path / "run"
    (out / "hf").mkdir(parents=True)  # an earlier run's export, trained on again: the final export replaces it
    with pytest.raises(ValueError, match=rf"trainer.output_dir={out}: the run writes and replaces {out / 'hf'}, which "
                                         rf"is the input model.path={out / 'hf'}"):
        trainer(out / "hf", out)
    (out / "plots").mkdir()
    data = out / "plots" / "train.parquet"
    with pytest.raises(ValueError, match=r"replaces .*plots, which holds the input data.train_files\[0\]="):
        trainer(model, out, f"data.train_files=[{data}]")
    (tmp_path / "d").mkdir()  # a saved dataset folder, its test split held out
    with pytest.raises(ValueError, match=rf"trainer.output_dir={tmp_path / 'd' / 'run'} lies inside the input "
                                         rf"data.eval_files\[0\]={tmp_path / 'd'}@test"):
        trainer(model, tmp_path / "d" / "run", f"data.eval_files=[{tmp_path / 'd'}@test]")
    assert not (out / OWNER_FILE).exists()


def test_inputs_elsewhere_in_the_run_folder_are_fine(tmp_path):
    out = tmp_path / "run"
    check_run_apart(out, {"model.path": tmp_path / "model", "data.train_files[0]": out / "data" / "train.parquet"},
                    written=("checkpoints", "plots", "hf"))
    with pytest.raises(ValueError, match="which holds the input data.train_files"):
        check_run_apart(out, {"data.train_files[0]": out / "checkpoints" / "x.parquet"}, written=("checkpoints",))
