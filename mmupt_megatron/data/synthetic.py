"""The demo's synthetic visual-counting world: grid images of coloured shapes and counting questions.

An image is a ``grid x grid`` board of ``cell_px``-pixel cells (default 3 x 3 cells of 28 px = 84 x 84, so a
Qwen2.5-VL encoder with 14-px patches merged 2 x 2 sees exactly one merged image token per cell). Each cell
is empty or holds one red / green / blue circle / square / triangle, jittered in position and size.
Questions: "How many red shapes are there?", "How many squares are there?", "How many shapes are there?".

Every example carries its held-out answer (evaluation only) and a *target chain* for the supervised
warm-up that makes the task learnable for a tiny model (/work/shared/DEMO.md, third prototype): the chain
names each cell's relevant attribute (its colour word for a colour question, its shape word for a shape
question, ``x`` for "how many shapes", ``-`` for an empty cell), then ``\\boxed{N}`` (``named``):
``red - blue red - - green - red \\boxed{3}``. ``tally`` adds the running count of matches after every
cell (``red 1 - 1 blue 1 red 2 ...``); ``describe`` names both colour and shape of every cell whatever the
question, then the running count (``red circle 1 - - 1 blue square 1 ...``). Every cell then takes the
same number of output tokens, so output step k lines up with image token k by position alone.

``WorldConfig.hard()`` is a harder split (small shapes, pale colours, noise and clutter) on which a model
warmed up on the default world is weak. Everything is deterministic given the seed.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "all")
CHAIN_STYLES: tuple[str, ...] = ("named", "tally", "describe")
EMPTY_WORD = "-"
ALL_WORD = "x"


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """How scenes are drawn and asked about."""

    grid: int = 3
    """Cells per side."""
    cell_px: int = 28
    """Cell size in pixels (28 = one merged Qwen2.5-VL token per cell)."""
    min_objects: int = 1
    max_objects: int | None = None
    """At most this many occupied cells (None: every cell)."""
    shape_px: tuple[int, int] = (14, 22)
    """Range of a shape's size (bounding box side) in pixels."""
    jitter_px: int = 2
    """Maximum offset of a shape's centre from its cell's centre."""
    colour_jitter: int = 25
    """Maximum per-channel change of a shape's colour."""
    pale: float = 0.0
    """Blend of each shape's colour towards grey (0 = pure colour, 0.6 = hard to tell apart)."""
    noise_std: float = 0.0
    """Standard deviation of per-pixel Gaussian noise (0-255 scale)."""
    num_clutter: int = 0
    """Grey distractor line segments drawn over the board."""
    background: tuple[int, int, int] = (245, 245, 245)
    question_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Sampling weights of colour / shape / all questions."""
    chain_style: str = "named"
    """Target chain for supervised warm-up: ``named`` or ``tally`` (see module docstring)."""

    def __post_init__(self) -> None:
        cells = self.grid * self.grid
        max_objects = cells if self.max_objects is None else self.max_objects
        if self.grid < 1 or self.cell_px < 8:
            raise ValueError(f"world: grid must be >= 1 and cell_px >= 8, got {self.grid} and {self.cell_px}")
        if not 0 <= self.min_objects <= max_objects <= cells:
            raise ValueError(f"world: need 0 <= min_objects <= max_objects <= {cells}, got {self.min_objects}, {max_objects}")
        if not 4 <= self.shape_px[0] <= self.shape_px[1] <= self.cell_px:
            raise ValueError(f"world: shape_px must satisfy 4 <= lo <= hi <= cell_px, got {self.shape_px}")
        if self.chain_style not in CHAIN_STYLES:
            raise ValueError(f"world: chain_style must be one of {CHAIN_STYLES}, got {self.chain_style!r}")
        if len(self.question_weights) != 3 or min(self.question_weights) < 0 or sum(self.question_weights) <= 0:
            raise ValueError(f"world: question_weights needs 3 non-negative weights, got {self.question_weights}")

    @property
    def image_px(self) -> int:
        return self.grid * self.cell_px

    @classmethod
    def hard(cls, **overrides: object) -> WorldConfig:
        """The harder split: small, pale shapes, pixel noise and clutter on the same board."""
        return cls.shifted(1.0, **overrides)

    @classmethod
    def shifted(cls, severity: float, **overrides: object) -> WorldConfig:
        """The same board moved ``severity`` of the way (0 = default world, 1 = ``hard()``) towards small,
        pale, noisy, cluttered scenes: a domain shift of tunable size."""
        if not 0.0 <= severity <= 1.0:
            raise ValueError(f"world: severity must be in [0, 1], got {severity}")
        t = severity
        settings: dict[str, object] = {"shape_px": (round(14 - 7 * t), round(22 - 11 * t)), "jitter_px": round(2 + 4 * t),
                                       "pale": 0.55 * t, "noise_std": 30.0 * t, "num_clutter": round(6 * t)}
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Cell:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    grid: int
    cells: tuple[Cell | None, ...]
    """Row-major, ``grid * grid`` entries."""


@dataclass(frozen=True)
class Example:
    """One question about one image, with its held-out answer and warm-up target chain."""

    id: str
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    chain: str
    kind: str
    word: str
    """The asked colour / shape, or ``x`` for "how many shapes"."""
    scene: Scene = field(repr=False)


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    cells = cfg.grid * cfg.grid
    max_objects = cells if cfg.max_objects is None else cfg.max_objects
    occupied = set(rng.sample(range(cells), rng.randint(cfg.min_objects, max_objects)))
    colours, shapes = list(COLOURS), list(SHAPES)
    return Scene(
        grid=cfg.grid,
        cells=tuple(Cell(rng.choice(colours), rng.choice(shapes)) if i in occupied else None for i in range(cells)),
    )


def _shape_colour(rng: random.Random, name: str, cfg: WorldConfig) -> tuple[int, int, int]:
    grey = 128
    out = []
    for channel in COLOURS[name]:
        value = (1 - cfg.pale) * channel + cfg.pale * grey + rng.randint(-cfg.colour_jitter, cfg.colour_jitter)
        out.append(int(min(255, max(0, value))))
    return out[0], out[1], out[2]


def render(scene: Scene, rng: random.Random, cfg: WorldConfig) -> Image.Image:
    """Draw the scene (RGB, ``image_px`` square); the rng draws jitter, sizes, noise and clutter."""
    if scene.grid != cfg.grid:
        raise ValueError(f"scene has grid {scene.grid} but the world config has grid {cfg.grid}")
    size = cfg.image_px
    image = Image.new("RGB", (size, size), cfg.background)
    draw = ImageDraw.Draw(image)
    for index, cell in enumerate(scene.cells):
        if cell is None:
            continue
        row, col = divmod(index, cfg.grid)
        side = rng.randint(*cfg.shape_px)
        slack = max(0, min(cfg.jitter_px, (cfg.cell_px - side) // 2))
        cx = col * cfg.cell_px + cfg.cell_px / 2 + rng.randint(-slack, slack)
        cy = row * cfg.cell_px + cfg.cell_px / 2 + rng.randint(-slack, slack)
        half = side / 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = _shape_colour(rng, cell.colour, cfg)
        if cell.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif cell.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    for _ in range(cfg.num_clutter):
        grey = rng.randint(90, 200)
        points = [(rng.randint(0, size - 1), rng.randint(0, size - 1)) for _ in range(2)]
        draw.line(points, fill=(grey, grey, grey), width=1)
    if cfg.noise_std > 0:
        noise_rng = np.random.default_rng(rng.getrandbits(64))
        pixels = np.asarray(image, dtype=np.float32) + noise_rng.normal(0.0, cfg.noise_std, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    return image


def cell_word(cell: Cell | None, kind: str) -> str:
    """The chain's word for one cell under a question kind."""
    if cell is None:
        return EMPTY_WORD
    if kind == "colour":
        return cell.colour
    if kind == "shape":
        return cell.shape
    if kind == "all":
        return ALL_WORD
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def count_matches(scene: Scene, *, kind: str, word: str) -> int:
    return sum(cell_word(cell, kind) == word for cell in scene.cells)


def question_text(kind: str, word: str) -> str:
    if kind == "colour":
        return f"How many {word} shapes are there?"
    if kind == "shape":
        return f"How many {PLURALS[word]} are there?"
    if kind == "all":
        return "How many shapes are there?"
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def answer_chain(scene: Scene, *, kind: str, word: str, style: str = "named") -> str:
    """The warm-up target: one word per cell (plus a running tally for ``tally``), then the boxed count."""
    if style not in CHAIN_STYLES:
        raise ValueError(f"chain style must be one of {CHAIN_STYLES}, got {style!r}")
    parts: list[str] = []
    tally = 0
    for cell in scene.cells:
        name = cell_word(cell, kind)
        tally += name == word
        if style == "describe":
            parts.extend([cell.colour, cell.shape] if cell is not None else [EMPTY_WORD, EMPTY_WORD])
        else:
            parts.append(name)
        if style != "named":
            parts.append(str(tally))
    parts.append(f"\\boxed{{{count_matches(scene, kind=kind, word=word)}}}")
    return " ".join(parts)


def sample_question(rng: random.Random, cfg: WorldConfig) -> tuple[str, str]:
    """(kind, word) for a new question."""
    kind = rng.choices(QUESTION_KINDS, weights=cfg.question_weights)[0]
    if kind == "colour":
        return kind, rng.choice(list(COLOURS))
    if kind == "shape":
        return kind, rng.choice(SHAPES)
    return kind, ALL_WORD


def make_example(rng: random.Random, cfg: WorldConfig, *, example_id: str) -> Example:
    scene = sample_scene(rng, cfg)
    image = render(scene, rng, cfg)
    kind, word = sample_question(rng, cfg)
    return Example(
        id=example_id,
        image=image,
        question=question_text(kind, word),
        answer=str(count_matches(scene, kind=kind, word=word)),
        chain=answer_chain(scene, kind=kind, word=word, style=cfg.chain_style),
        kind=kind,
        word=word,
        scene=scene,
    )


def generate(num_examples: int, *, seed: int, cfg: WorldConfig | None = None, prefix: str = "ex") -> list[Example]:
    """``num_examples`` examples, identical for identical (seed, cfg)."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    cfg = cfg or WorldConfig()
    rng = random.Random(seed)
    return [make_example(rng, cfg, example_id=f"{prefix}-{seed}-{i}") for i in range(num_examples)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: str | Path, examples: Sequence[Example]) -> Path:
    """EasyR1/MM-UPT-style rows: id, problem, images=[{bytes, path}], answer, plus kind/word/chain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [e.id for e in examples],
            "problem": [e.question for e in examples],
            "images": [[{"bytes": png_bytes(e.image), "path": None}] for e in examples],
            "answer": [e.answer for e in examples],
            "kind": [e.kind for e in examples],
            "word": [e.word for e in examples],
            "chain": [e.chain for e in examples],
        }
    )
    pq.write_table(table, path)
    return path


def write_splits(
    out_dir: str | Path, *, num_train: int, num_test: int, num_hard_test: int = 0, seed: int = 0,
    cfg: WorldConfig | None = None,
) -> dict[str, Path]:
    """Write train.parquet, test.parquet (and hard_test.parquet) with disjoint seeds; returns the paths."""
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    paths = {
        "train": write_parquet(out / "train.parquet", generate(num_train, seed=seed, cfg=cfg, prefix="train")),
        "test": write_parquet(out / "test.parquet", generate(num_test, seed=seed + 1_000_003, cfg=cfg, prefix="test")),
    }
    if num_hard_test:
        hard = WorldConfig.hard(grid=cfg.grid, cell_px=cfg.cell_px, chain_style=cfg.chain_style,
                                question_weights=cfg.question_weights)
        paths["hard_test"] = write_parquet(
            out / "hard_test.parquet", generate(num_hard_test, seed=seed + 2_000_003, cfg=hard, prefix="hard")
        )
    return paths
