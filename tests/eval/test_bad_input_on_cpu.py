"""Bad benchmark files: every error names the file, the row and the field, and says what was expected."""

import json

import pytest

from mmupt_megatron.cli import main
from mmupt_megatron.config import DataConfig
from mmupt_megatron.eval import detect_benchmark, load_questions
from tests.eval import fixtures as fx

DATA = DataConfig()


def test_missing_image_names_the_row_the_id_and_the_path(tmp_path):
    path = fx.write_wemath(tmp_path)
    (tmp_path / "data" / "2steps" / "image" / "1-2.png").unlink()
    with pytest.raises(ValueError) as error:
        load_questions(path, "wemath", DATA)
    message = str(error.value)
    assert f"{path} row 1 (id '2steps_1:2steps_2'), field 'image_path': image file not found: 2steps/image/1-2.png" in message
    # every place looked in is named: the file's folder and its parent
    assert str(tmp_path / "data" / "2steps" / "image" / "1-2.png") in message
    assert str(tmp_path / "2steps" / "image" / "1-2.png") in message


def test_corrupt_image_names_the_row(tmp_path):
    path = fx.write_mathvision(tmp_path)
    (tmp_path / "images" / "2.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"row 1 \(id '2'\), field 'image': cannot decode image"):
        load_questions(path, "mathvision", DATA)


def test_missing_required_field_names_the_row_and_the_fields(tmp_path):
    rows = fx.mathverse_rows()
    del rows[2]["question_type"]
    path = fx.write_mathverse(tmp_path, rows)
    with pytest.raises(ValueError) as error:
        load_questions(path, "mathverse", DATA)
    message = str(error.value)
    assert f"{path} row 2: not a mathverse row: missing ['question_type']" in message
    assert "'sample_index'" in message and "this one has ['answer', 'image'" in message


def test_a_file_of_another_benchmark_says_which_one_it_looks_like(tmp_path):
    path = fx.write_wemath(tmp_path)
    with pytest.raises(ValueError) as error:
        load_questions(path, "mathvista", DATA)
    message = str(error.value)
    assert "row 0: not a mathvista row: missing ['pid', 'question_type', 'choices', 'decoded_image or image']" in message
    assert "it looks like a wemath row (--benchmark wemath)" in message


def test_unknown_format_lists_the_expected_fields(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"query": "q", "picture": "a.png", "label": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"odd.jsonl row 0: cannot tell the benchmark from the fields "
                                         r"\['label', 'picture', 'query'\]; expected the fields of mathvista \['pid'"):
        detect_benchmark(path, DATA)


@pytest.mark.parametrize(
    ("pid", "change", "match"),
    [
        ("1", {"answer": "maybe"}, (r"field 'answer': 'maybe' is neither an option's letter nor an option's "
                                    r"text \(options: A. yes; B. no\)")),
        ("4", {"answer": ["90"]}, r"field 'answer': expected a string, got list"),
        ("3", {"answer": None}, r"field 'answer': expected a string, got null"),
        ("1", {"choices": None}, r"field 'choices': a multi_choice question needs a non-empty list"),
        ("2", {"question_type": "multiple"}, r"field 'question_type': 'multiple' is neither multi_choice nor free_form"),
        ("3", {"answer_type": "complex"}, r"field 'answer_type': 'complex' is not one of integer, float, text, list"),
    ],
)
def test_unsupported_answer_shapes_name_the_row_and_field(tmp_path, pid, change, match):
    rows = fx.mathvista_rows()
    rows[pid].update(change)
    path = fx.write_mathvista(tmp_path, rows)
    with pytest.raises(ValueError, match=rf"row {int(pid) - 1} \(key '{pid}'\), {match}"):
        load_questions(path, "mathvista", DATA)


@pytest.mark.parametrize(
    ("option", "answer", "match"),
    [
        ("1;2;3", "A", r"field 'option': expected options starting with 'A.', got '1;2;3'"),
        ("A. 1;B. ;C. 3", "A", r"field 'option': option B is empty in 'A. 1;B. ;C. 3'"),
        ("A. 1;B. 2", "E", r"field 'answer': 'E' is neither an option's letter nor an option's text \(options: A. 1; B. 2\)"),
        ("A. 1;B. 2", "A\tB", r"field 'answer': 'A\\tB' contains control characters \['\\t'\]"),
    ],
)
def test_wemath_malformed_options_and_answers(tmp_path, option, answer, match):
    rows = fx.wemath_rows()
    rows[0].update(option=option, answer=answer)
    with pytest.raises(ValueError, match=r"row 0 \(id '2steps_1:2steps_1'\), " + match):
        load_questions(fx.write_wemath(tmp_path, rows), "wemath", DATA)


def test_empty_and_duplicate(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty benchmark file"):
        load_questions(empty, "mathvision", DATA)
    with pytest.raises(ValueError, match="empty benchmark file"):
        load_questions(empty, "auto", DATA)
    rows = fx.mathvision_rows()
    rows[1]["id"] = "1"
    with pytest.raises(ValueError, match=r"row 1 \(id '1'\), field 'id': duplicate id '1' \(id; first at row 0\)"):
        load_questions(fx.write_mathvision(tmp_path / "dup", rows), "mathvision", DATA)
    rows = fx.wemath_rows()
    rows[1]["key"] = "2steps_1"  # We-Math ids are ID + key
    with pytest.raises(ValueError, match=r"row 1 \(id '2steps_1:2steps_1'\), field 'key': duplicate id "
                                         r"'2steps_1:2steps_1' \(ID \+ key; first at row 0\)"):
        load_questions(fx.write_wemath(tmp_path / "dup_wemath", rows), "wemath", DATA)


def test_generic_rows_need_answers(tmp_path):
    path = tmp_path / "rows.jsonl"
    fx.write_png(tmp_path / "a.png", 1)
    path.write_text(json.dumps({"problem": "How many?", "images": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl row 0, field 'answer': evaluation rows need an answer"):
        load_questions(path, "generic", DATA)


def test_the_command_reports_a_bad_row_without_a_traceback(tmp_path, capsys):
    path = fx.write_wemath(tmp_path)
    (tmp_path / "data" / "2steps" / "image" / "1-1.png").unlink()
    (tmp_path / "model").mkdir()
    code = main(["eval", "--model", str(tmp_path / "model"), "--data", str(path), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "mmupt: error:" in err and "row 0 (id '2steps_1:2steps_1'), field 'image_path'" in err
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from mmupt_megatron.eval.rows import read_rows

    jsonl = tmp_path / "test.jsonl"
    jsonl.write_bytes(b'{"id": 1, "question": "ok"}\n{"id": 2, "question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl line 2: not UTF-8 text"):
        list(read_rows(jsonl))
    single = tmp_path / "testmini.json"
    single.write_bytes(b'[\n {"pid": "1",\n  "question": "\xff"}\n]\n')
    with pytest.raises(ValueError, match=r"testmini.json line 3: not UTF-8 text"):
        list(read_rows(single))
