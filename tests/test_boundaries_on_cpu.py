"""The algorithm package stays pure: no engine or communication imports (checked on the source's AST)."""

import ast
from pathlib import Path

from mmupt_megatron import algorithms

FORBIDDEN = ("megatron", "vllm", "ray", "nemo_run", "torch.distributed", "transformers")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "torch":
                names.update(f"torch.{alias.name}" for alias in node.names)
    return names


def test_algorithms_import_no_engine():
    files = sorted(Path(algorithms.__file__).parent.glob("*.py"))
    assert len(files) >= 6
    offenders = {
        f"{path.name}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offenders, f"algorithms/ must stay pure, found imports {sorted(offenders)}"


def test_the_checker_catches_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from torch import distributed\nimport vllm.sampling_params\n")
    assert {"torch.distributed", "vllm.sampling_params"} <= imported_modules(bad)
