"""The synthetic world: determinism per seed, answers consistent with scenes and chains, parquet output."""

import random
import re

import numpy as np
import pytest

from mmupt_megatron.algorithms import extract_boxed
from mmupt_megatron.data.dataset import ImageQuestionDataset
from mmupt_megatron.data.synthetic import (
    WorldConfig,
    answer_chain,
    count_matches,
    generate,
    sample_scene,
    write_splits,
)


@pytest.mark.parametrize("cfg", [WorldConfig(), WorldConfig.hard(), WorldConfig(chain_style="describe")])
def test_same_seed_same_examples_different_seed_different(cfg):
    a, b, c = generate(20, seed=7, cfg=cfg), generate(20, seed=7, cfg=cfg), generate(20, seed=8, cfg=cfg)
    assert [e.chain for e in a] == [e.chain for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [e.chain for e in a] != [e.chain for e in c]


@pytest.mark.parametrize("style", ["named", "tally", "describe"])
def test_chain_ends_in_the_answer_and_names_every_cell(style):
    per_cell = {"named": 1, "tally": 2, "describe": 3}[style]
    for example in generate(50, seed=1, cfg=WorldConfig(chain_style=style)):
        assert extract_boxed(example.chain) == example.answer
        words = example.chain.split()[:-1]
        assert len(words) == 9 * per_cell  # fixed-length segments: step k lines up with cell k
        empty = sum(cell is None for cell in example.scene.cells)
        assert words.count("-") == empty * (2 if style == "describe" else 1)
        if style != "named":
            tallies = [int(w) for w in words[per_cell - 1 :: per_cell]]
            assert tallies == sorted(tallies) and tallies[-1] == int(example.answer)
            assert all(b - a in (0, 1) for a, b in zip([0] + tallies, tallies))


def test_answers_count_the_scene():
    for example in generate(100, seed=2):
        cells = [c for c in example.scene.cells if c is not None]
        expected = {
            "colour": sum(c.colour == example.word for c in cells),
            "shape": sum(c.shape == example.word for c in cells),
            "all": len(cells),
        }[example.kind]
        assert int(example.answer) == expected
        assert re.fullmatch(r"How many \w+( shapes)? are there\?", example.question)


def test_rendering_puts_colour_in_occupied_cells_only():
    cfg = WorldConfig(jitter_px=0, colour_jitter=0)
    for example in generate(10, seed=3, cfg=cfg):
        pixels = np.asarray(example.image).astype(int)
        for index, cell in enumerate(example.scene.cells):
            row, col = divmod(index, 3)
            centre = pixels[row * 28 + 14, col * 28 + 14]
            if cell is None:
                assert tuple(centre) == cfg.background
            else:
                assert int(np.argmax(centre)) == {"red": 0, "green": 1, "blue": 2}[cell.colour]


def test_hard_world_differs_and_question_mix_is_balanced():
    easy = generate(300, seed=4)
    kinds = {k: sum(e.kind == k for e in easy) for k in ("colour", "shape", "all")}
    assert all(70 < n < 130 for n in kinds.values())
    hard = generate(5, seed=4, cfg=WorldConfig.hard())
    assert np.asarray(hard[0].image).std() > 0 and hard[0].image.size == (84, 84)


def test_config_validation_and_tally():
    with pytest.raises(ValueError, match="chain_style"):
        WorldConfig(chain_style="free")
    with pytest.raises(ValueError, match="shape_px"):
        WorldConfig(shape_px=(20, 40))
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(min_objects=5, max_objects=3)
    scene = sample_scene(random.Random(0), WorldConfig(min_objects=9))
    chain = answer_chain(scene, kind="all", word="x", style="tally")
    assert chain.startswith("x 1 x 2") and chain.endswith("x 9 \\boxed{9}") and count_matches(scene, kind="all", word="x") == 9


def test_synthesize_writes_parquet_with_real_pngs(tmp_path):
    paths = write_splits(tmp_path, num_train=12, num_test=5, num_hard_test=4, seed=0)
    train = ImageQuestionDataset(paths["train"])
    test = ImageQuestionDataset(paths["test"])
    hard = ImageQuestionDataset(paths["hard_test"])
    assert (len(train), len(test), len(hard)) == (12, 5, 4)
    sample, image = train[0]
    assert image.size == (84, 84) and sample.answer is not None and sample.question.startswith("How many")
    assert {s.id for s in train.samples}.isdisjoint({s.id for s in test.samples})


def test_shifted_world_interpolates_from_default_to_hard():
    base, hard = WorldConfig(), WorldConfig.hard()
    zero, half = WorldConfig.shifted(0.0), WorldConfig.shifted(0.5)
    fields = ("shape_px", "jitter_px", "pale", "noise_std", "num_clutter")
    assert all(getattr(zero, f) == getattr(base, f) for f in fields)
    assert WorldConfig.shifted(1.0) == hard
    assert hard.shape_px < half.shape_px < base.shape_px and base.pale < half.pale < hard.pale
    with pytest.raises(ValueError, match="severity"):
        WorldConfig.shifted(1.5)
