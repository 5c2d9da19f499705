"""Benchmark loaders on small files in each published format: prompts, letters, categories, detection."""

import pytest

from mmupt_megatron.config import DataConfig
from mmupt_megatron.eval import detect_benchmark, load_questions
from mmupt_megatron.eval.prompts import CHOICE_INSTRUCTION, eval_items, num_image_tokens, question_text
from tests.eval import fixtures as fx

DATA = DataConfig()


def by_id(questions):
    return {q.id: q for q in questions}


@pytest.mark.parametrize("writer", [fx.write_mathvista, fx.write_mathvista_parquet], ids=["json", "parquet"])
def test_mathvista_letters_hints_and_categories(tmp_path, writer):
    path = writer(tmp_path)
    assert detect_benchmark(path, DATA) == "mathvista"
    questions = by_id(load_questions(path, "mathvista", DATA))
    assert list(questions) == ["1", "2", "3", "4"]
    # multiple choice: the answer is the choice's text in the file, its letter here
    assert questions["1"].choice and questions["1"].options == ("yes", "no") and questions["1"].answer == "B"
    assert questions["4"].answer == "C"
    assert question_text(questions["4"]).splitlines() == [
        "Which angle is the largest?", "Options:", "A. 30", "B. 60", "C. 90", CHOICE_INSTRUCTION,
    ]
    # free form: unit and decimal places become hints; the answer is kept as it is
    free = questions["2"]
    assert not free.choice and free.options == () and free.answer == "1.5"
    assert free.hints == ("Give the number only, without the unit (cm).",
                          "The answer is a decimal number with 1 decimal place.")
    assert questions["3"].hints == ("The answer is an integer.",)
    assert {q.category for q in questions.values()} == {"figure question answering", "geometry problem solving"}
    assert questions["1"].meta["skills"] == ["statistical reasoning"] and questions["1"].image_size == (60, 40)


def test_wemath_options_string_and_knowledge_concepts(tmp_path):
    path = fx.write_wemath(tmp_path)
    assert detect_benchmark(path, DATA) == "wemath"
    first, second = load_questions(path, "auto", DATA)
    assert first.options == ("3.14", "6.28", "12.56", "1", "No correct answer") and first.answer == "C"
    assert second.options == ("2", "3") and second.answer == "A"
    assert (first.category, second.category) == ("Area of Circles", "Counting")
    assert first.meta["key"] == "2steps_2" and first.id == "2steps_1"


def test_mathverse_choices_block_vision_only_and_text_answers(tmp_path):
    path = fx.write_mathverse(tmp_path)
    assert detect_benchmark(path, DATA) == "mathverse"
    q = by_id(load_questions(path, "auto", DATA))
    # the "Choices:" block inside the question becomes lettered options
    assert q["1"].question == "As shown in the figure, angle AOB is 80°, what is angle BOC?"
    assert q["1"].options == ("40°", "50°", "60°", "80°") and q["1"].answer == "B"
    # Vision Only: no text, choices only in the image; still a letter answer
    assert q["2"].choice and q["2"].options == () and q["2"].answer == "B"
    assert question_text(q["2"]) == f"Answer the question shown in the image.\n{CHOICE_INSTRUCTION}"
    assert not q["3"].choice and q["3"].answer == "12"
    # an answer given as the option's text maps to its letter
    assert q["4"].options == ("True", "False") and q["4"].answer == "B"
    assert [q[i].category for i in "1234"] == ["Text Dominant", "Vision Only", "Text Lite", "Text Dominant"]


def test_mathvision_image_markers_and_free_form(tmp_path):
    path = fx.write_mathvision(tmp_path)
    assert detect_benchmark(path, DATA) == "mathvision"
    multi, free = load_questions(path, "auto", DATA)
    assert multi.question == "Which number is in the middle?" and multi.answer == "C" and len(multi.options) == 5
    assert free.question == "How many dots are hidden?" and not free.choice and free.answer == "7"
    assert (multi.category, free.category, multi.meta) == ("arithmetic", "counting", {"level": 2})


def test_generic_rows_in_the_training_format(tmp_path):
    path = fx.write_generic(tmp_path)
    assert detect_benchmark(path, DATA) == "generic"
    questions = load_questions(path, "auto", DATA)
    assert [(q.id, q.answer, q.category, q.choice) for q in questions] == [("g1", "3", "all", False), ("g2", "4", "all", False)]


def test_prompts_use_the_training_template_and_images_load_lazily(tmp_path):
    data = DataConfig(instruction=" Answer in \\boxed{}.", system_prompt=None, image_first=False,
                      min_pixels=56 * 56, max_pixels=56 * 56)
    questions = load_questions(fx.write_mathvista(tmp_path), "mathvista", data, limit=2)
    items = eval_items(questions, data)
    assert len(items) == 2 and [i.id for i in items] == ["1", "2"] and items[0].answer == "B"
    assert items[0].prompt == (
        "<|im_start|>user\nIs the bar taller than the line?\nOptions:\nA. yes\nB. no\n"
        f"{CHOICE_INSTRUCTION} Answer in \\boxed{{}}.<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    (image,) = list(items[0].images)
    # decoded when read and fitted by Qwen's smart resize (60x40 -> sides that are multiples of 28)
    assert image.size == (84, 56) and image.mode == "RGB"
    assert num_image_tokens(questions[0].image_size, data) == 3 * 2


def test_limit_stops_reading(tmp_path):
    path = fx.write_mathvista(tmp_path)
    (tmp_path / "images" / "4.png").unlink()  # row 3 is never read with --limit 3
    assert len(load_questions(path, "mathvista", DATA, limit=3)) == 3
    with pytest.raises(ValueError, match="row 3 \\(key '4'\\), field 'image': image file not found"):
        load_questions(path, "mathvista", DATA)
