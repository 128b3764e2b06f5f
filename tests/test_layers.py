"""The package's layers import one way (DESIGN §6), with the rules read from `docs/architecture.md`'s table,
so the test and the doc cannot drift. Every import in `mmlatent/` is read with `ast`, including imports
inside functions and under `TYPE_CHECKING`, and checked:

- every module belongs to exactly one layer of the table;
- it imports only its own layer and the layers of its row's *may import* column (within `mmlatent`), and
  none of the outside packages of its *never imports* column;
- modules import each other without a cycle (imports under `TYPE_CHECKING` excepted: they only annotate);
- nothing imports the repository's `train/`, `eval/`, `datasets/` or `benchmarks/` folders, or reaches them
  through `Path(__file__).parents[...]` (an installed package has no such folders).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmlatent"
TABLE_DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Layer:
    name: str
    paths: tuple[str, ...]
    """Files and folders (ending in `/`) relative to the repository root."""
    may_import: frozenset[str]
    never_imports: tuple[str, ...]


def read_layers(doc: str) -> list[Layer]:
    """The rows of the table in the doc's `## Layers` section."""
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = {name: header.index(name) for name in ("layer", "modules", "may import", "never imports")}
    layers = []
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[col["modules"]])
        paths = tuple(n if n.startswith("mmlatent/") else f"mmlatent/{n}" for n in names)
        may = frozenset(x.strip() for x in cells[col["may import"]].split(",") if x.strip() not in ("", "—"))
        layers.append(Layer(cells[col["layer"]], paths, may, tuple(re.findall(r"`([^`]+)`", cells[col["never imports"]]))))
    return layers


LAYERS = read_layers(TABLE_DOC.read_text(encoding="utf-8"))
BY_NAME = {layer.name: layer for layer in LAYERS}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layers_of(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    return [layer.name for layer in LAYERS for p in layer.paths if rel == p or (p.endswith("/") and rel.startswith(p))]


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the statements under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def imports(path: Path, annotations: bool = True) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it sits (without those under
    `TYPE_CHECKING` when not `annotations`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if annotations else type_checking_lines(tree)
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
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


MODULES = {module_name(p): p for p in sources()}


def owner(name: str) -> str | None:
    """The package module an imported name lives in (None outside mmlatent): the longest known prefix."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_table_is_read():
    assert [layer.name for layer in LAYERS][:2] == ["neutral", "scoring"] and "commands" in BY_NAME
    assert "mmlatent/tokens.py" in BY_NAME["neutral"].paths and BY_NAME["model"].paths == ("mmlatent/model/",)
    assert BY_NAME["training"].may_import >= {"data", "model", "losses"} and not BY_NAME["neutral"].may_import
    assert "lightning" in BY_NAME["model"].never_imports
    for layer in LAYERS:
        assert layer.may_import <= set(BY_NAME), f"{layer.name} may import an unknown layer: {layer.may_import}"
        for p in layer.paths:
            assert (ROOT / p).exists(), f"docs/architecture.md names {p} (layer {layer.name}), which does not exist"


def test_the_checker_sees_imports_inside_functions_and_tells_annotations_apart():
    probe = PACKAGE / "model" / "_layer_probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmlatent.hub import export\n"
                     "def f():\n    from mmlatent.data import batch\n    import lightning\n")
    try:
        names = [n for _, n in imports(probe)]
        runtime = [n for _, n in imports(probe, annotations=False)]
    finally:
        probe.unlink()
    assert {"mmlatent.data", "mmlatent.data.batch", "lightning", "mmlatent.hub.export"} <= set(names)
    assert "mmlatent.hub.export" not in runtime and "mmlatent.data.batch" in runtime


def test_every_module_belongs_to_one_layer():
    bad = [f"{p.relative_to(ROOT)} is in layers {layers_of(p)}" for p in sources() if len(layers_of(p)) != 1]
    assert not bad, "add each to one row of docs/architecture.md's table:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", [layer.name for layer in LAYERS])
def test_layer_imports_only_what_the_table_allows(layer):
    rules = BY_NAME[layer]
    allowed = rules.may_import | {layer}
    bad = []
    for path in sources():
        if layers_of(path) != [layer]:
            continue
        for line, name in imports(path):
            target = owner(name)
            if target is not None:
                [other] = layers_of(MODULES[target])
                if other not in allowed:
                    bad.append(f"{where(path, line)} imports {name} (layer {other})")
            elif name.split(".")[0] in rules.never_imports:
                bad.append(f"{where(path, line)} imports {name}")
    assert not bad, f"layer {layer} may import {sorted(allowed)} and never {list(rules.never_imports)}:\n" + "\n".join(bad)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_modules_import_each_other_without_a_cycle():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for _, name in imports(path, annotations=False):
            target = owner(name)
            # a package's own __init__ (`mmlatent`, `mmlatent.model`) is a parent being imported, not a partner
            if target is not None and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    assert not import_cycles(graph), import_cycles(graph)


def test_nothing_in_the_package_reaches_the_repository_folders():
    bad = []
    for path in sources():
        depth = len(path.relative_to(PACKAGE).parts)  # mmlatent/x.py: 1; mmlatent/model/x.py: 2
        for line, name in imports(path):
            if name.split(".")[0] in ("train", "eval", "benchmarks") or name.startswith(("datasets.monet", "datasets.mmmu")):
                bad.append(f"{where(path, line)} imports {name}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # Path(__file__)...parents[k] with k >= depth leaves the package
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int) and node.slice.value >= depth:
                    bad.append(f"{where(path, node.lineno)} reaches outside the package (parents[{node.slice.value}])")
    assert not bad, "\n".join(bad)
