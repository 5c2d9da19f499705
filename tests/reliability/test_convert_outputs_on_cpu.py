"""Hostile output paths for ``mmupt convert``: an output that is, contains or sits inside the input is refused
(with or without --force) before anything is written; --force replaces only a folder a conversion wrote; a
conversion killed before its completion marker is not taken for a checkpoint."""

import json

import pytest

from mmupt_megatron.cli import main
from mmupt_megatron.models.convert import META_FILE, hf_to_megatron, megatron_to_hf, read_checkpoint_meta
from tests.tiny_models import make_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("hostile") / "model", seed=0)


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize(("where", "message"), [
    (lambda m: m, "is the input --hf .* itself"),                        # --out M --hf M
    (lambda m: m.parent, "contains the input --hf"),                      # --out a parent of --hf
    (lambda m: m / "sub", "lies inside the input --hf"),                  # --out inside --hf
    (lambda m: m / ".." / m.name, "is the input --hf .* itself"),         # the same folder, spelled otherwise
])
def test_convert_never_writes_over_its_input(model, where, message, capsys):
    before = snapshot(model)
    out = where(model)
    assert main(["convert", "hf-to-megatron", "--hf", str(model), "--out", str(out), "--force"]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert snapshot(model) == before  # nothing deleted, nothing added


def test_symlinked_output_to_the_input_is_refused(model, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="is the input --hf"):
        hf_to_megatron(model, link, force=True)
    assert snapshot(model) == before


def test_megatron_to_hf_output_inside_the_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "megatron").mkdir(parents=True)
    (ckpt / "megatron" / "metadata.json").write_text("{}")
    (ckpt / "megatron" / ".metadata").write_bytes(b"")
    (ckpt / META_FILE).write_text(json.dumps({"tp": 1, "pp": 1}))
    for out, message in ((ckpt, "is the input --ckpt"), (ckpt / "hf", "lies inside the input --ckpt"),
                         (tmp_path, "contains the input --ckpt")):
        with pytest.raises(ValueError, match=message):
            from mmupt_megatron.models.convert import prepare_output_dir

            prepare_output_dir(out, force=True, inputs={"--ckpt": ckpt}, kind="test")
    assert (ckpt / "megatron" / "metadata.json").is_file()


def test_force_does_not_delete_a_folder_it_did_not_write(model, tmp_path):
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="was not written by mmupt .* never deleted, not even with --force"):
        hf_to_megatron(model, users, force=True)
    assert (users / "thesis.tex").read_text() == "years of work"


def test_an_interrupted_conversion_is_not_a_checkpoint(tmp_path):
    """What a conversion killed during the dist-checkpoint save leaves: metadata files but no data index."""
    ckpt = tmp_path / "killed"
    (ckpt / "megatron").mkdir(parents=True)
    (ckpt / "hf").mkdir()
    (ckpt / "megatron" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(ValueError, match="is not a complete mmupt Megatron checkpoint"):
        read_checkpoint_meta(ckpt)
    (ckpt / META_FILE).write_text(json.dumps({"tp": 1, "pp": 1}))  # an older version wrote this first
    with pytest.raises(ValueError, match=r"incomplete Megatron checkpoint: .* lacks \['metadata.json', '.metadata'\]"):
        megatron_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
