"""Field documentation of the config dataclasses, read from their attribute docstrings."""

from __future__ import annotations

import ast
import inspect
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from mmupt_megatron.config import Config


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal written right below it in the class body}."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """[(dotted key, type, default, doc)] for every leaf field."""
    rows = []
    docs = field_docs(cls)
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            rows.extend(describe_keys(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", str(f.type), default, docs.get(f.name, "")))
    return rows
