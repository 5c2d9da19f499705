"""The package's layers import only downward, and the algorithm layer stays pure (checked on the source's AST,
lazy imports inside functions included)."""

import ast
from pathlib import Path

import pytest

import mmupt_megatron

PACKAGE = Path(mmupt_megatron.__file__).parent
FORBIDDEN = ("megatron", "vllm", "ray", "nemo_run", "torch.distributed", "transformers")
LAYERS = (
    ("algorithms",),
    ("config", "config_loading", "config_docs", "config_synthesis", "output_dirs"),
    ("data", "distributed"),
    ("models",),
    ("engines",),
    ("eval",),
    ("synthesis",),
    ("trainer",),
    ("demo", "launch", "cli", "cli_errors"),
)
"""Bottom to top. A module may import its own layer and the ones below. Each package's ``cli.py`` (and
``convert_cli.py``) is a command-line front and belongs to the top layer."""


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in ("torch", "mmupt_megatron"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> int:
    """The layer of ``mmupt_megatron.a.b`` (by its first component ``a``; CLI fronts at the top)."""
    parts = module.split(".")[1:]
    if parts and parts[-1] in ("cli", "convert_cli"):
        return len(LAYERS) - 1
    for rank, names in enumerate(LAYERS):
        if parts and parts[0] in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)


def upward_imports(files: list[Path]) -> set[str]:
    out = set()
    for path in files:
        importer = module_name(path)
        for name in imported_modules(path):
            if name.startswith("mmupt_megatron.") and layer_of(name) > layer_of(importer):
                out.add(f"{importer} -> {name}")
    return out


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "vllm_cpu_site" not in p.parts and p != PACKAGE / "__init__.py")


def test_layers_import_only_downward():
    files = package_files()
    assert len(files) > 50
    assert not upward_imports(files), "imports against the layering:\n" + "\n".join(sorted(upward_imports(files)))


def test_algorithms_import_no_engine():
    files = sorted((PACKAGE / "algorithms").glob("*.py"))
    assert len(files) >= 6
    offenders = {
        f"{path.name}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offenders, f"algorithms/ must stay pure, found imports {sorted(offenders)}"


def test_the_checkers_catch_offenders(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from torch import distributed\nimport vllm.sampling_params\n"
                   "def f():\n    from mmupt_megatron import trainer\n")
    assert {"torch.distributed", "vllm.sampling_params", "mmupt_megatron.trainer"} <= imported_modules(bad)
    assert layer_of("mmupt_megatron.trainer.loop") > layer_of("mmupt_megatron.models.convert")
    assert layer_of("mmupt_megatron.eval.cli") == layer_of("mmupt_megatron.cli")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mmupt_megatron.newpackage.thing")
