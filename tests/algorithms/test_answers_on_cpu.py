import pytest

from mmupt_megatron.algorithms import extract_answers, extract_boxed


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{x^{2}+\sqrt{y_{1}}}", r"x^{2}+\sqrt{y_{1}}"),
        (r"\fbox{(B)}", "(B)"),
        (r"thus \boxed 5$", "5"),
        (r"thus \boxed 5", "5"),
        (r"\boxed { 7 }", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{1} so \boxed{2}", "2"),  # text between: the first box was a draft
        (r"\boxed{1}.\boxed{2}", "2"),
        (r"x=\boxed{1}, y=\boxed{2}", "2"),
    ],
)
def test_extracts_last_box(response, expected):
    assert extract_boxed(response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"\boxed{1}\boxed{2}", "1, 2"),
        (r"so \boxed{1}, \boxed{2}.", "1, 2"),
        (r"$\boxed{x=1}$ or $\boxed{x=2}$", "x=1, x=2"),
        (r"\boxed{1}\quad\boxed{2}\text{ and }\boxed{3}", "1, 2, 3"),
        (r"\boxed{(1,2)}; \boxed{(3,4)}", "(1,2), (3,4)"),
        (r"a draft \boxed{7} then \boxed{1} and \boxed{2}", "1, 2"),
        ("\\boxed{3}\n\n\\boxed{3}", "3"),  # a restated answer is that answer
        (r"\boxed{}\boxed{4}", "4"),
    ],
)
def test_adjacent_final_boxes_are_one_list(response, expected):
    assert extract_boxed(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        "the answer is 42",
        r"\boxed{}",
        r"\boxed{   }",
        r"\boxed{3} and then \boxed{\frac{1}{2}",  # truncated final box: no final answer
        r"\boxed{3}, \boxed{4",  # a list cut off in its last box
        r"\boxedx{3}",
        "",
    ],
)
def test_no_answer_is_none(response):
    assert extract_boxed(response) is None


def test_non_string_is_rejected_with_index():
    with pytest.raises(TypeError, match="response 1 is int"):
        extract_answers([r"\boxed{1}", 3])
