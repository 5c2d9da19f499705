"""Benchmark loaders on small files in each published format: prompts, letters, categories, detection."""

import pytest

from mmupt_megatron.config import DataConfig
from mmupt_megatron.eval import detect_benchmark, load_questions
from mmupt_megatron.eval.prompts import CHOICE_INSTRUCTION, benchmark_items, fitted_image_tokens, question_text
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


def test_wemath_ids_are_id_plus_key_and_options_are_read_as_published(tmp_path):
    path = fx.write_wemath(tmp_path)
    assert detect_benchmark(path, DATA) == "wemath"
    q = by_id(load_questions(path, "auto", DATA))
    # ID repeats across key: one question per ID + key
    assert list(q) == ["2steps_1:2steps_1", "2steps_1:2steps_2", "2steps_1:2steps_multi", "3steps_1:3steps_1",
                       "3steps_1:3steps_2", "3steps_1:3steps_3", "3steps_1:3steps_multi"]
    first = q["2steps_1:2steps_1"]
    assert first.options == ("1 cm", "1.5 cm", "3.14 cm", "6.28 cm", "No correct answer") and first.answer == "A"
    # no separator between A and B
    assert q["2steps_1:2steps_2"].options == ("45°", "60°", "120°") and q["2steps_1:2steps_2"].answer == "B"
    # a skipped letter keeps the printed letters, and the answer F is the fifth option
    multi = q["2steps_1:2steps_multi"]
    assert multi.labels == ("A", "B", "C", "D", "F") and multi.answer == "F"
    assert question_text(multi).splitlines()[-2:] == ["F. No correct answer", CHOICE_INSTRUCTION]
    # option texts that are letters: the published letter D is the answer, not the option whose text is "D"
    letters = q["3steps_1:3steps_1"]
    assert letters.options == ("F", "D", "B", "I", "No correct answer") and letters.answer == "D"
    assert (first.category, letters.category) == ("Circumference of Circles", "Left-Right Position")
    assert first.meta == {"ID": "2steps_1", "key": "2steps_1", "split": "testmini", "question number": 1,
                          "steps": 2, "part": "1"}
    assert [q[i].groups["steps"] for i in q] == [("one-step",)] * 2 + [("two-step",)] + [("one-step",)] * 3 + [("three-step",)]


def test_mathverse_choices_headers_vision_only_and_two_answers(tmp_path):
    path = fx.write_mathverse(tmp_path)
    assert detect_benchmark(path, DATA) == "mathverse"
    q = by_id(load_questions(path, "auto", DATA))
    # the "Choices:" block inside the question becomes lettered options
    assert q["1"].question == "As shown in the figure, angle AOB is 80°, what is angle BOC?"
    assert q["1"].options == ("40°", "50°", "60°", "80°") and q["1"].answer == "B"
    # Vision Only: no text, choices only in the image; still a letter answer
    assert q["2"].choice and q["2"].options == () and q["2"].answer == "B" and q["2"].meta["options_in_image"]
    assert question_text(q["2"]) == f"Answer the question shown in the image.\n{CHOICE_INSTRUCTION}"
    assert not q["3"].choice and q["3"].answer == "12"
    # "Choice:" header; an answer given as the option's text maps to its letter
    assert q["4"].question == "Is the line tangent?" and q["4"].options == ("True", "False") and q["4"].answer == "B"
    # two right answers: the reference is both letters
    assert q["5"].answer == "C, D" and q["5"].meta["answers"] == ["C", "D"]
    assert [q[i].category for i in "12345"] == ["Text Dominant", "Vision Only", "Text Lite", "Vision Intensive",
                                               "Vision Dominant"]
    assert q["5"].groups == {"version": ("Vision Dominant",), "subject": ("Solid Geometry",)}


def test_mathvision_repository_layout_markers_letters_and_escapes(tmp_path):
    path = fx.write_mathvision(tmp_path)  # data/test.jsonl, images/ at the root
    assert detect_benchmark(path, DATA) == "mathvision"
    multi, free, only_marker, fraction = load_questions(path, "auto", DATA)
    assert multi.question == "Which number is in the middle?" and multi.answer == "C" and len(multi.options) == 5
    assert multi.image == tmp_path / "images" / "1.jpg"
    assert free.question == "How many dots are hidden?" and not free.choice and free.answer == "7"
    # a question that is only the image marker, options drawn in the image: a letter answer
    assert only_marker.question == "Answer the question shown in the image." and only_marker.choice
    assert only_marker.answer == "B" and only_marker.options == () and only_marker.meta["options_in_image"]
    # "\frac" written with one backslash in the file: read as \frac again, and the repair is recorded
    assert fraction.answer == "\\frac{1}{2}" and not fraction.choice
    assert fraction.meta["repaired_answer"] == {"published": "\x0crac{1}{2}", "read_as": "\\frac{1}{2}"}
    assert (multi.category, free.category, multi.meta) == ("arithmetic", "counting", {"level": 2, "subject": "arithmetic"})
    assert multi.groups == {"subject": ("arithmetic",), "level": ("level 2",)}


def test_generic_rows_in_the_training_format(tmp_path):
    path = fx.write_generic(tmp_path)
    assert detect_benchmark(path, DATA) == "generic"
    questions = load_questions(path, "auto", DATA)
    assert [(q.id, q.answer, q.category, q.choice) for q in questions] == [("g1", "3", "all", False), ("g2", "4", "all", False)]


def test_prompts_use_the_training_template_and_images_load_lazily(tmp_path):
    data = DataConfig(instruction=" Answer in \\boxed{}.", system_prompt=None, image_first=False,
                      min_pixels=56 * 56, max_pixels=56 * 56)
    questions = load_questions(fx.write_mathvista(tmp_path), "mathvista", data, limit=2)
    items = benchmark_items(questions, data)
    assert len(items) == 2 and [i.id for i in items] == ["1", "2"] and items[0].answer == "B"
    assert items[0].prompt == (
        "<|im_start|>user\nIs the bar taller than the line?\nOptions:\nA. yes\nB. no\n"
        f"{CHOICE_INSTRUCTION} Answer in \\boxed{{}}.<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    (image,) = list(items[0].images)
    # decoded when read and fitted by Qwen's smart resize (60x40 -> sides that are multiples of 28)
    assert image.size == (84, 56) and image.mode == "RGB"
    assert fitted_image_tokens(questions[0].image_size, data) == 3 * 2


def test_limit_stops_reading(tmp_path):
    path = fx.write_mathvista(tmp_path)
    (tmp_path / "images" / "4.png").unlink()  # row 3 is never read with --limit 3
    assert len(load_questions(path, "mathvista", DATA, limit=3)) == 3
    with pytest.raises(ValueError, match="row 3 \\(key '4'\\), field 'image': image file not found"):
        load_questions(path, "mathvista", DATA)
