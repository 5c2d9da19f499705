"""Loading a recipe: YAML (with at most one ``defaults:`` parent) + ``key=value`` overrides -> ``Config``.

    mmupt config show demo trainer.steps=10 rollout.n=16
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mmupt_megatron.config import Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _all_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), key + "."))
        else:
            keys.append(key)
    return keys


def _did_you_mean(key: str, schema: Any = Config) -> str:
    known = _all_keys(schema)
    leaf = key.rsplit(".", 1)[-1]
    # a right name in the wrong section first, then the closest spelling
    matches = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    matches = matches or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe is a YAML path or the name of a file in configs/ (``demo`` -> configs/demo.yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"recipe {str(recipe)!r} is neither a file nor one of configs/: {available}")


class DuplicateKeyError(ValueError):
    """A YAML mapping gives one key twice (plain YAML keeps the last silently)."""


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    """DuplicateKeyError naming the dotted key and both lines when a mapping under ``node`` repeats a key."""
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                dotted = f"{path}.{key_node.value}" if path else str(key_node.value)
                line = key_node.start_mark.line + 1
                seen = first.get((key_node.tag, key_node.value))
                if seen is not None:
                    raise DuplicateKeyError(f"key {dotted!r} is given twice, on line {seen} and on line {line} (YAML "
                                            "would keep the last silently): keep one")
                first[(key_node.tag, key_node.value)] = line
                _check_unique_keys(value_node, dotted)
            else:
                _check_unique_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{index}]")


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping with a repeated key (DuplicateKeyError naming key and lines)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path, *, what: str = "a recipe") -> dict[str, Any]:
    """A YAML file's mapping; ValueError naming the file when it is not one, or when it gives a key twice."""
    try:
        data = safe_load_unique(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    except DuplicateKeyError as error:
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a mapping, got {type(data).__name__}")
    return data


def recipe_layers(recipe: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """[(source, mapping)] from parent to child; ``defaults:`` names one parent, which may not have one."""
    path = resolve_recipe(recipe)
    data = read_yaml(path)
    parent_name = data.pop("defaults", None)
    if parent_name is None:
        return [(str(path), data)]
    if not isinstance(parent_name, str):
        raise ValueError(f"{path}: defaults must name one parent recipe, got {parent_name!r}")
    sibling = path.parent / parent_name
    parent_path = sibling if sibling.is_file() else resolve_recipe(parent_name)
    parent = read_yaml(parent_path)
    if "defaults" in parent:
        raise ValueError(
            f"{path}: its parent {parent_path} has a defaults: of its own; recipes compose one level deep"
        )
    return [(str(parent_path), parent), (str(path), data)]


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} must look like section.key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]


COMMAND_LINE = "the command line"


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _origin(problem: str, origins: dict[str, tuple[str, Any]]) -> str:
    """Where the value a problem names came from: the command line (with the key=value given), a recipe file."""
    named = list(dict.fromkeys(key for key in re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\b", problem) if key in origins))
    given = [key for key in named if origins[key][0] == COMMAND_LINE]
    if given:
        return ", ".join(f"from {COMMAND_LINE}: {key}={origins[key][1]}" for key in given)
    return f"from {origins[named[0]][0]}" if named else "default"


def merge_layers(schema: Any, layers: Sequence[tuple[str, dict[str, Any]]], overrides: Sequence[str] = ()
                 ) -> tuple[Any, dict[str, tuple[str, Any]]]:
    """A ``schema`` dataclass from (source, mapping) layers merged in order (the command line's last), and where
    each key's value came from. ValueError naming the source and the key for an unknown key (with a suggestion)
    or a value of the wrong type. The one loader of recipes and cluster files."""
    merged = OmegaConf.structured(schema)
    origins: dict[str, tuple[str, Any]] = {}
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except (ConfigKeyError, ConfigAttributeError) as error:
            key = error.full_key or str(error.key)
            raise ValueError(f"{source}: unknown config key {key!r}{_did_you_mean(key, schema)}") from None
        except OmegaConfBaseException as error:
            message = str(error).splitlines()[0]
            given = dict(item.split("=", 1) for item in overrides).get(str(error.full_key))
            where = f"from {COMMAND_LINE}: {error.full_key}={given}" if source == COMMAND_LINE else source
            raise ValueError(f"{where}: bad value for {error.full_key!r}: {message}") from None
        origins.update({key: (source, value) for key, value in _flatten(layer).items()})
    # the command line's values as typed (``trainer.lr=1e-3``, not the parsed 0.001)
    origins.update({key: (COMMAND_LINE, text) for key, _, text in (item.partition("=") for item in overrides)})
    return OmegaConf.to_object(merged), origins


def check_problems(config: Any, origins: dict[str, tuple[str, Any]], *, what: str = "config") -> None:
    """ValueError listing every ``config.problems()``, each with where its value came from."""
    problems = config.problems()
    if problems:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(f"{p} ({_origin(p, origins)})" for p in problems))


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The validated ``Config`` of a recipe with overrides; ValueError naming every problem and where each
    offending value came from (the command line or a recipe file)."""
    layers = recipe_layers(recipe) + [(COMMAND_LINE, parse_overrides(overrides))]
    config, origins = merge_layers(Config, layers, overrides)
    if not config.logging.wandb_group:
        config.logging.wandb_group = resolve_recipe(recipe).stem
    check_problems(config, origins)
    return config


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
