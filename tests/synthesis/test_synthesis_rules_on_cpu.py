"""The pure synthesis rules: prompts, the question format, every rejection reason, near-duplicate search."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmupt_megatron.algorithms.synthesis import (
    CLOSE_TAG,
    OPEN_TAG,
    REASONS,
    QuestionLimits,
    answer_verdict,
    choose_seed_answer,
    count_reasons,
    jaccard,
    near_duplicates,
    parse_question,
    question_tokens,
    screen_question,
    shingles,
    similarity,
    synthesis_prompt,
)

SEED = "How many red shapes are there?"
LIMITS = QuestionLimits(min_words=3, max_words=20, max_chars=120, repeat_threshold=0.8)


def test_in_context_prompt_shows_seed_and_answer_or_says_it_is_missing():
    with_answer = synthesis_prompt("in-context", seed_question=SEED, seed_answer=" 3 ")
    assert SEED in with_answer and "Answer: 3\n" in with_answer and "not given" not in with_answer
    without = synthesis_prompt("in-context", seed_question=SEED, seed_answer=None)
    assert SEED in without and "Answer:" not in without and "not given" in without
    direct = synthesis_prompt("direct", seed_question=SEED, seed_answer="3")
    assert SEED not in direct and "3" not in direct
    for prompt in (with_answer, without, direct):
        assert OPEN_TAG in prompt and CLOSE_TAG in prompt


def test_custom_template_and_bad_arguments():
    assert synthesis_prompt("in-context", seed_question=SEED, template="Q={question} A={answer} \\boxed{}") == (
        f"Q={SEED} A=unknown \\boxed{{}}")
    with pytest.raises(ValueError, match="mode"):
        synthesis_prompt("sideways", seed_question=SEED)
    with pytest.raises(ValueError, match="seed question"):
        synthesis_prompt("in-context", seed_question="  ")


@pytest.mark.parametrize("policy, data, majority, expected", [
    ("auto", "3", "4", ("3", "data")),
    ("auto", None, "4", ("4", "majority")),
    ("auto", " ", None, (None, "none")),
    ("data", None, "4", (None, "none")),
    ("majority", "3", "4", ("4", "majority")),
    ("majority", "3", None, (None, "none")),
    ("none", "3", "4", (None, "none")),
])
def test_choose_seed_answer(policy, data, majority, expected):
    assert choose_seed_answer(policy, data_answer=data, majority_answer=majority) == expected


def test_choose_seed_answer_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        choose_seed_answer("oracle", data_answer="1", majority_answer=None)


@pytest.mark.parametrize("text, expected", [
    ("Sure. <question> How many squares? </question> Done.", ("How many squares?", None)),
    ("<QUESTION>Case does not matter</ Question >", ("Case does not matter", None)),
    ("<question>draft</question> better: <question>final one</question>", ("final one", None)),
    ("<question>How many squares are", (None, "unclosed")),  # ran out of tokens
    ("<question>draft</question> then <question>a redraft that never ends", (None, "unclosed")),
    ("How many squares are there?", (None, "no_question")),
    ("How many squares?</question>", (None, "no_question")),
    ("", (None, "no_question")),
    ("<question> \n </question>", (None, "empty")),
])
def test_parse_question(text, expected):
    assert parse_question(text) == expected


def test_parse_question_wants_a_string():
    with pytest.raises(TypeError, match="generation must be a str, got NoneType"):
        parse_question(None)


@pytest.mark.parametrize("generation, reason", [
    ("no tags at all", "no_question"),
    ("<question>How many blue", "unclosed"),
    ("<question></question>", "empty"),
    ("<question>Is the <|image_pad|> red today?</question>", "special_tokens"),
    ("<question>How many shapes are < /</question>", "tag_fragment"),  # measured on the demo: a botched tag
    ("<question>How many shapes < question are there?</question>", "tag_fragment"),
    ("<question>How many shapes question> are there?</question>", "tag_fragment"),
    ("<question>Is x < 3 or is the question about y > 4?</question>", None),  # comparisons are not tags
    ("<question>How many?</question>", "too_short"),
    ("<question>" + "very " * 20 + "long question?</question>", "too_long"),
    ("<question>" + "x" * 130 + " is it?</question>", "too_long"),
    ("<question>how many RED shapes are there</question>", "repeats_seed"),
    ("<question>So, how many red shapes are there?</question>", "repeats_seed"),  # near-equal: 5/6 bigrams
    ("<question>How many blue shapes are there?</question>", None),
    ("<question>What is 3+4 times the number of circles?</question>", None),
])
def test_screen_question_gives_one_reason_per_rejection(generation, reason):
    question, got = screen_question(generation, seed_question=SEED, limits=LIMITS)
    assert got == reason
    assert (question is None) == (reason is not None)


def test_every_reason_code_is_exercised_by_name():
    assert set(REASONS) >= {"no_question", "unclosed", "empty", "special_tokens", "tag_fragment", "too_short", "too_long",
                            "repeats_seed", "near_duplicate", "unanswerable", "agreement_band"}


def test_normalisation_keeps_operators_and_drops_punctuation():
    assert question_tokens("What is 3+4?  (A) x^2") == ["what", "is", "3", "+", "4", "a", "x", "^", "2"]
    assert similarity("What is 3+4?", "what is 3 + 4") == 1.0
    assert similarity("What is 3+4?", "What is 3*4?") < 0.5
    assert shingles([]) == frozenset() and shingles(["a"]) == frozenset([("a",)])
    assert jaccard(frozenset(), frozenset()) == 1.0


def test_near_duplicates_keep_the_earliest_per_group():
    texts = ["How many blue circles are there?", "how many blue circles are there",
             "How many blue circles are there?", "What colour is the big square?", "How many blue circles are there?"]
    assert near_duplicates(texts, threshold=0.8) == [None, 0, 0, None, 0]
    # per image: the same question about another image is not a duplicate
    assert near_duplicates(texts, threshold=0.8, groups=["a", "a", "b", "b", "a"]) == [None, 0, None, None, 0]
    assert near_duplicates(["??", "!!", "ok fine"], threshold=0.9) == [None, 0, None]  # token-less texts
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(texts, threshold=0.0)
    with pytest.raises(ValueError, match="groups"):
        near_duplicates(texts, threshold=0.5, groups=["a"])


def _brute_force(texts, threshold, groups):
    sets = [shingles(question_tokens(t)) for t in texts]
    kept: list[int] = []
    out = []
    for i, s in enumerate(sets):
        match = next((j for j in kept if groups[j] == groups[i] and jaccard(s, sets[j]) >= threshold), None)
        out.append(match)
        if match is None:
            kept.append(i)
    return out


WORDS = st.sampled_from(["how", "many", "red", "blue", "shapes", "are", "there", "circles", "3", "+", "x"])


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(st.lists(WORDS, min_size=0, max_size=7).map(" ".join), min_size=1, max_size=25),
    threshold=st.sampled_from([0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 1.0]),
    num_groups=st.integers(1, 3),
)
def test_prefix_filtered_search_equals_comparing_every_pair(texts, threshold, num_groups):
    groups = [i % num_groups for i in range(len(texts))]
    assert near_duplicates(texts, threshold=threshold, groups=groups) == _brute_force(texts, threshold, groups)


def test_dedup_is_deterministic_and_depends_only_on_order():
    rng = random.Random(0)
    words = ["how", "many", "red", "blue", "green", "shapes", "circles", "are", "there", "left"]
    texts = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)]
    first = near_duplicates(texts, threshold=0.5)
    assert first == near_duplicates(list(texts), threshold=0.5)
    assert 0 < sum(d is not None for d in first) < len(texts)
    # reversing the order keeps the earliest of the reversed order instead
    reversed_kept = {len(texts) - 1 - i for i, d in enumerate(near_duplicates(texts[::-1], threshold=0.5)) if d is None}
    assert reversed_kept != {i for i, d in enumerate(first) if d is None}


@pytest.mark.parametrize("answered, share, expected", [
    (1, 0.25, "unanswerable"),   # 1 of 4 boxed: below half
    (2, 0.5, None),              # exactly half is enough
    (4, 1.0, "agreement_band"),  # unanimous: above the band
    (4, 0.25, "agreement_band"),  # four different answers: below the band
    (4, 0.75, None),
])
def test_answer_verdict(answered, share, expected):
    assert answer_verdict(num_samples=4, num_answered=answered, majority_share=share, min_answered=0.5,
                          band=(0.3, 0.9)) == expected


def test_answer_verdict_checks_counts():
    with pytest.raises(ValueError, match="num_answered <= num_samples"):
        answer_verdict(num_samples=4, num_answered=5, majority_share=1.0, min_answered=0.5)


def test_count_reasons_lists_every_reason():
    counts = count_reasons([None, "unclosed", "unclosed", None, "too_short"])
    assert counts["candidates"] == 5 and counts["kept"] == 2 and counts["unclosed"] == 2
    assert set(counts) == {"candidates", "kept", *REASONS} and counts["agreement_band"] == 0
    with pytest.raises(ValueError, match="unknown rejection"):
        count_reasons(["cosmic_rays"])


def test_limits_validate():
    with pytest.raises(ValueError, match="min_words <= max_words"):
        QuestionLimits(min_words=5, max_words=2)
    with pytest.raises(ValueError, match=r"repeat_threshold must be in \(0, 1\]"):
        QuestionLimits(repeat_threshold=0)
