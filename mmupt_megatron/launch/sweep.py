"""A sweep: a grid over config keys (YAML) that expands into one override list per point.

    # configs/sweeps/qwen2_5_vl_7b_lr_temperature.yaml
    recipe: qwen2_5_vl_7b_1n8g_tp2
    name: lr-temp
    overrides: [trainer.steps=200]
    grid:
      trainer.lr: [5.0e-7, 1.0e-6, 2.0e-6]
      rollout.temperature: [0.7, 1.0]

``mmupt launch --sweep FILE --cluster CLUSTER.yaml`` turns the 6 points into one nemo-run experiment with 6
tasks; each point gets its own ``trainer.output_dir`` and ``logging.run_name`` unless the grid sets them.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmupt_megatron.config_loading import load_config, read_yaml


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    name: str
    overrides: list[str]


@dataclass(kw_only=True)
class Sweep:
    recipe: str
    """Recipe every point starts from."""
    name: str = "sweep"
    """Experiment name; task names are NAME-00, NAME-01, ... plus the point's values."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to every point (before the grid's)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Config key -> list of values; the sweep is their Cartesian product."""

    def points(self, extra_overrides: list[str] | tuple[str, ...] = ()) -> list[SweepPoint]:
        keys = list(self.grid)
        out = []
        for index, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            tag = "_".join(f"{k.rsplit('.', 1)[-1]}{_short(v)}" for k, v in zip(keys, values))
            name = f"{self.name}-{index:02d}" + (f"-{tag}" if tag else "")
            name = re.sub(r"[^0-9A-Za-z_.-]+", "-", name)[:120]
            point = [f"{k}={_yaml_value(v)}" for k, v in zip(keys, values)]
            defaults = []
            if "trainer.output_dir" not in self.grid:
                base = load_config(self.recipe, [*self.overrides, *extra_overrides]).trainer.output_dir
                defaults.append(f"trainer.output_dir={base.rstrip('/')}/{name}")
            if "logging.run_name" not in self.grid:
                defaults.append(f"logging.run_name={name}")
            out.append(SweepPoint(name=name, overrides=[*self.overrides, *defaults, *point, *extra_overrides]))
        return out


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path: str | Path) -> Sweep:
    """The ``Sweep`` in a YAML file; ValueError naming the file and key; every point is validated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {str(path)!r} does not exist")
    data = read_yaml(path, what="a sweep (recipe and grid)")
    unknown = set(data) - {"recipe", "name", "overrides", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)} (known: recipe, name, overrides, grid)")
    if not isinstance(data.get("recipe"), str):
        raise ValueError(f"{path}: recipe must name one recipe")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: grid must map config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise ValueError(f"{path}: overrides must be a list of key=value strings")
    sweep = Sweep(recipe=data["recipe"], name=str(data.get("name", path.stem)), overrides=[str(o) for o in overrides],
                  grid={str(k): list(v) for k, v in grid.items()})
    for point in sweep.points():
        try:
            load_config(sweep.recipe, point.overrides)
        except ValueError as error:
            raise ValueError(f"{path}: point {point.name} is invalid: {error}") from None
    return sweep
