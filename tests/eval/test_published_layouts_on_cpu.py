"""Every published layout of the four benchmarks (repository JSON / JSONL with its image folders, Hugging Face
parquet), their quirks, ``eval.on_bad_row=skip`` with counted reasons, and the pieces underneath: letters
first, option strings, broken escapes, image folders, the engine's context limit."""

import json

import pytest

from mmupt_megatron.config import DataConfig
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.data.prompts import IMAGE_PLACEHOLDER
from mmupt_megatron.eval import detect_benchmark, load_benchmark, load_questions
from mmupt_megatron.eval.limits import check_context, engine_limits
from mmupt_megatron.eval.prompts import benchmark_items, fitted_image_tokens
from mmupt_megatron.eval.rows import Row, choice_answer, repair_escapes, split_options
from tests.eval import fixtures as fx

DATA = DataConfig()


def counts(loaded):
    summary = loaded.skip_summary()
    return summary["rows_read"], summary["loaded"], summary["skipped_by_reason"]


LAYOUTS = {
    "mathvista testmini.json": (fx.write_mathvista, "mathvista", 4),
    "mathvista parquet": (fx.write_mathvista_parquet, "mathvista", 4),
    "wemath data/testmini.json": (fx.write_wemath, "wemath", 7),
    "wemath parquet": (fx.write_wemath_parquet, "wemath", 7),
    "mathverse testmini.json": (fx.write_mathverse, "mathverse", 5),
    "mathverse testmini_text_only.json": (fx.write_mathverse_text_only, "mathverse", 2),
    "mathverse parquet": (lambda p: fx.write_mathverse_parquet(p)[0], "mathverse", 5),
    "mathverse text-only parquet": (lambda p: fx.write_mathverse_parquet(p)[1], "mathverse", 2),
    "mathvision data/test.jsonl": (fx.write_mathvision, "mathvision", 4),
    "mathvision parquet": (fx.write_mathvision_parquet, "mathvision", 4),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_published_layout_loads_completely(tmp_path, layout):
    writer, benchmark, rows = LAYOUTS[layout]
    path = writer(tmp_path)
    assert detect_benchmark(path, DATA) == benchmark
    loaded = load_benchmark(path, "auto", DATA, on_bad_row="skip")
    assert loaded.benchmark == benchmark and counts(loaded) == (rows, rows, {})
    items = benchmark_items(loaded.questions, DATA)
    assert all(len(item.images) == (q.image is not None) for item, q in zip(items, loaded.questions, strict=True))


def test_the_same_questions_from_json_and_parquet(tmp_path):
    def key(questions):
        return [(q.id, q.question, q.options, q.labels, q.answer, q.category, q.groups, q.image_size) for q in questions]

    for json_writer, parquet_writer in [(fx.write_wemath, fx.write_wemath_parquet),
                                        (fx.write_mathvision, fx.write_mathvision_parquet),
                                        (fx.write_mathverse, lambda p: fx.write_mathverse_parquet(p)[0]),
                                        (fx.write_mathverse_text_only, lambda p: fx.write_mathverse_parquet(p)[1])]:
        folder = tmp_path / json_writer.__name__
        assert key(load_questions(json_writer(folder / "json"), "auto", DATA)) == \
            key(load_questions(parquet_writer(folder / "parquet"), "auto", DATA))


def test_mathverse_text_only_questions_have_no_image(tmp_path):
    questions = load_questions(fx.write_mathverse_text_only(tmp_path), "auto", DATA)
    choice, free = questions
    assert choice.image is None and choice.image_size is None and choice.options == ("40°", "50°", "60°", "80°")
    assert choice.category == "Text Only" and free.answer == "12"
    items = benchmark_items(questions, DATA)
    assert all(IMAGE_PLACEHOLDER not in item.prompt and list(item.images) == [] for item in items)
    assert fitted_image_tokens(None, DATA) == 0
    # only the Text Only version may come without an image
    rows = fx.mathverse_rows()
    rows[0]["image"] = ""
    with pytest.raises(ValueError, match=r"row 0 \(id '1'\), field 'image': no image"):
        load_questions(fx.write_mathverse(tmp_path / "vision", rows), "mathverse", DATA)


def test_images_dir_and_parent_folder(tmp_path):
    # MathVerse with its image folders unpacked elsewhere: --images names the folder
    path = fx.write_mathverse(tmp_path / "data", images=tmp_path / "unpacked")
    with pytest.raises(ValueError, match=r"row 0 \(id '1'\), field 'image': image file not found: "
                                         r"images_version_1-4/image_1.png \(looked in .*--images DIR"):
        load_questions(path, "mathverse", DATA)
    questions = load_questions(path, "mathverse", DATA, images=tmp_path / "unpacked")
    assert questions[0].image == tmp_path / "unpacked" / "images_version_1-4" / "image_1.png"
    # absolute paths are used as they are
    rows = fx.mathverse_rows()[:1]
    rows[0]["image"] = str(tmp_path / "unpacked" / rows[0]["image"])
    assert load_questions(fx.write_mathverse(tmp_path / "absolute", rows), "mathverse", DATA)[0].image == \
        tmp_path / "unpacked" / "images_version_1-4" / "image_1.png"
    rows[0]["image"] = str(tmp_path / "gone.png")
    gone = tmp_path / "absolute" / "gone.json"
    gone.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"row 0 \(id '1'\), field 'image': image file not found: .*gone.png"):
        load_questions(gone, "mathverse", DATA)
    with pytest.raises(ValueError, match="--images .*nowhere: not a folder"):
        load_questions(path, "mathverse", DATA, images=tmp_path / "nowhere")


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    rows = fx.wemath_rows()
    rows[1]["option"] = "1;2;3"  # no letters
    rows[4]["answer"] = "G"  # not an option
    rows.append({**rows[0], "image_path": "2steps/image/missing.png", "ID": "2steps_9"})
    rows.append({**rows[2]})  # the same ID + key again
    path = fx.write_wemath(tmp_path, rows)
    (tmp_path / "data" / "2steps" / "image" / "missing.png").unlink()
    with pytest.raises(ValueError, match=r"row 1 \(id '2steps_1:2steps_2'\), field 'option': expected options"):
        load_benchmark(path, "wemath", DATA)
    loaded = load_benchmark(path, "wemath", DATA, on_bad_row="skip")
    assert counts(loaded) == (9, 5, {"option: options do not start with A.": 1,
                                     "answer: answer is not one of the options": 1,
                                     "image_path: image file not found": 1, "key: duplicate id": 1})
    skipped = loaded.skip_summary()["skipped_rows"]
    assert skipped[0]["origin"] == f"{path} row 1 (id '2steps_1:2steps_2')"
    assert skipped[0]["field"] == "option" and "got '1;2;3'" in skipped[0]["message"]
    # a row of another shape is skipped too, and a file with nothing usable is an error
    mixed = tmp_path / "mixed.jsonl"
    good = fx.mathvision_rows()[0]
    fx.write_png(tmp_path / "images" / "1.jpg", 1)
    mixed.write_text(json.dumps(good) + "\n" + json.dumps({"id": "9", "question": "q"}) + "\n" + json.dumps([1]) + "\n")
    assert counts(load_benchmark(mixed, "mathvision", DATA, on_bad_row="skip")) == (
        3, 1, {"missing ['options', 'answer', 'decoded_image or image']": 1, "not an object": 1})
    with pytest.raises(ValueError, match=r"no usable rows: all 3 were skipped"):
        load_benchmark(mixed, "mathverse", DATA, on_bad_row="skip")
    with pytest.raises(ValueError, match="eval.on_bad_row must be one of"):
        load_benchmark(mixed, "mathvision", DATA, on_bad_row="ignore")


def test_on_bad_row_is_a_config_key():
    assert load_config("demo").eval.on_bad_row == "error"
    assert load_config("demo", ["eval.on_bad_row=skip"]).eval.on_bad_row == "skip"
    with pytest.raises(ValueError, match="eval.on_bad_row must be error or skip, got 'ignore'"):
        load_config("demo", ["eval.on_bad_row=ignore"])


def test_letters_first_where_the_benchmark_publishes_letters(tmp_path):
    row = Row(tmp_path / "f.json", 0, {})
    options = ("F", "D", "B", "I")
    assert choice_answer(row, "answer", "D", options) == "D"
    assert choice_answer(row, "answer", "(D)", options) == "D"
    # MathVista publishes the choice's text: text first there
    assert choice_answer(row, "answer", "D", options, published="text") == "B"
    # an answer that is not letter-shaped may still be an option's text
    assert choice_answer(row, "answer", "True", ("True", "False")) == "A"
    assert choice_answer(row, "answer", "F", ("1", "No"), ("A", "F")) == "F"
    with pytest.raises(ValueError, match=r"field 'answer': 'E' is neither an option's letter"):
        choice_answer(row, "answer", "E", ("1", "No"), ("A", "F"))
    # no options (drawn in the image): a letter only
    assert choice_answer(row, "answer", "C", ()) == "C"
    with pytest.raises(ValueError, match=r"'12' is neither an option's letter nor an option's text \(options: none"):
        choice_answer(row, "answer", "12", ())


@pytest.mark.parametrize(
    ("raw", "letters", "texts"),
    [
        ("A. 3;B. 4;C. 5", "ABC", ("3", "4", "5")),
        ("A. 45° B. 60° ;C. 120°", "ABC", ("45°", "60°", "120°")),
        ("A. F;    B. D;    C. B;    D. I; E. No correct answer", "ABCDE", ("F", "D", "B", "I", "No correct answer")),
        ("A. 1;B. 2;C. 3;D. 4; F. No correct answer", "ABCDF", ("1", "2", "3", "4", "No correct answer")),
        ("A. 30, 50, 40.; B. 3, 5, 4", "AB", ("30, 50, 40.", "3, 5, 4")),
        ("A:True\nB:False", "AB", ("True", "False")),
        ("(A) 1 (B) 2", "AB", ("1", "2")),
        ("A. Point B is left of C; B. right", "AB", ("Point B is left of C", "right")),  # "B" alone is no marker
    ],
)
def test_option_strings(tmp_path, raw, letters, texts):
    assert split_options(Row(tmp_path / "f.json", 0, {}), "option", raw) == (tuple(letters), texts)


def test_broken_escapes_are_repaired_not_mangled():
    assert repair_escapes("\x0crac{1}{2}") == ("\\frac{1}{2}", 1)
    assert repair_escapes("2\times 3") == ("2\\times 3", 1)
    assert repair_escapes("x \neq 1, \right)") == ("x \\neq 1, \\right)", 2)
    assert repair_escapes("\beta") == ("\\beta", 1)
    # a newline before a plain word, or two answers on two lines, are left alone
    assert repair_escapes("C\nD") == ("C\nD", 0) and repair_escapes("one\ntwo") == ("one\ntwo", 0)
    assert repair_escapes("line\nto the right", commands=False) == ("line\nto the right", 0)
    assert repair_escapes("\x0crac12", commands=False) == ("\\frac12", 1)


def test_engine_context_limit_is_read_from_the_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 2048},
                                                      "max_position_embeddings": 4096}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                            "longest_edge": 12544}}))
    limits = engine_limits(tmp_path)
    assert (limits.max_positions, limits.source, limits.pixels) == (
        2048, "config.json text_config.max_position_embeddings", (3136, 12544))
    assert check_context(limits, max_prompt_length=1024, max_new_tokens=1024, model=tmp_path) == 2048
    with pytest.raises(ValueError, match=r"rollout.max_prompt_length=2048 \+ rollout.max_new_tokens=2048 = 4096 tokens "
                                         r"is more than the model serves: 2048 \(config.json text_config"):
        check_context(limits, max_prompt_length=2048, max_new_tokens=2048, model=tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1000}))
    assert engine_limits(tmp_path).max_positions == 1000
    # the model's processor resizes the fitted image again: a 28x28 image becomes 56x56 (4 tokens, not 1)
    small = DataConfig(min_pixels=28 * 28, max_pixels=28 * 28)
    assert fitted_image_tokens((28, 28), small) == 1 and fitted_image_tokens((28, 28), small, limits.pixels) == 4
