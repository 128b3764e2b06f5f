"""The package's layers import one way (DESIGN §6). Every import in `mmlatent/` is read with `ast`, including
imports inside functions and under `TYPE_CHECKING`, and checked against the rules:

- `mmlatent/data` never imports `mmlatent/model` (both may use the neutral `mmlatent.tokens`);
- `mmlatent/model` never imports Lightning, `mmlatent/training`, `mmlatent/hub` or `mmlatent/data`;
- `mmlatent/losses` never imports `mmlatent/model` (losses know tensors, not model classes);
- nothing in `mmlatent/` imports the repository's `train/`, `eval/`, `datasets/` or `benchmarks/` folders, or
  reaches them through `Path(__file__).parents[...]` (an installed package has no such folders).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmlatent"
REPO_FOLDERS = ("train", "eval", "datasets", "benchmarks")

RULES: dict[str, tuple[str, ...]] = {
    "mmlatent.data": ("mmlatent.model",),
    "mmlatent.model": ("lightning", "pytorch_lightning", "mmlatent.training", "mmlatent.hub", "mmlatent.data"),
    "mmlatent.losses": ("mmlatent.model",),
}
"""Package -> the modules it must not import (a module or anything below it)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return out


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = PACKAGE / "model" / "_layer_probe.py"
    probe.write_text("def f():\n    from mmlatent.data import batch\n    import lightning\n")
    try:
        names = [n for _, n in imports(probe)]
    finally:
        probe.unlink()
    assert "mmlatent.data" in names and "mmlatent.data.batch" in names and "lightning" in names


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_point_one_way(layer):
    bad = []
    for path in sources():
        if not is_within(module_name(path), layer):
            continue
        for line, name in imports(path):
            if any(is_within(name, forbidden) for forbidden in RULES[layer]):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_in_the_package_reaches_the_repository_folders():
    bad = []
    for path in sources():
        depth = len(path.relative_to(PACKAGE).parts)  # mmlatent/x.py: 1; mmlatent/model/x.py: 2
        for line, name in imports(path):
            if name.split(".")[0] in ("train", "eval", "benchmarks") or name.startswith(("datasets.monet", "datasets.mmmu")):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # Path(__file__)...parents[k] with k >= depth leaves the package
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int) and node.slice.value >= depth:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reaches outside the package (parents[{node.slice.value}])")
    assert not bad, "\n".join(bad)
