"""``--model``: HF folders are served as they are; Megatron and training checkpoints are converted first."""

import json

import pytest

from mmupt_megatron.eval.model import detect_model_format, served_model


def hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def megatron_folder(path):
    (path / "megatron").mkdir(parents=True)
    (path / "mmupt_checkpoint.json").write_text(json.dumps({"tp": 1, "pp": 1}))
    return path


def test_detects_each_kind(tmp_path):
    assert detect_model_format(hf_folder(tmp_path / "hf")) == ("hf", tmp_path / "hf")
    assert detect_model_format(megatron_folder(tmp_path / "meg")) == ("megatron", tmp_path / "meg")
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    megatron_folder(step / "policy")
    assert detect_model_format(step) == ("megatron", step / "policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an HF folder .* nor a Megatron checkpoint"):
        detect_model_format(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a folder"):
        detect_model_format(tmp_path / "missing")


def test_hf_is_served_in_place_and_megatron_through_a_temporary_conversion(tmp_path):
    calls = []

    def fake_convert(ckpt, out):
        calls.append(ckpt)
        hf_folder(out)

    with served_model(hf_folder(tmp_path / "hf"), convert=fake_convert) as served:
        assert (served.path, served.format) == (tmp_path / "hf", "hf") and not calls
    step = tmp_path / "step_000003"
    megatron_folder(step / "policy")
    with served_model(step, convert=fake_convert) as served:
        assert calls == [step / "policy"] and served.format == "megatron" and served.source == step
        assert (served.path / "config.json").is_file() and served.convert_s >= 0
        converted = served.path
    assert not converted.exists()  # the temporary HF folder is gone afterwards
