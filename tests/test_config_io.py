"""Typed configs from and to plain dicts: nested and optional dataclasses rebuilt, lists made tuples where the
field says tuple, instances passed through, unknown keys named by their dotted path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from mmlatent.config_io import from_dict, to_dict
from mmlatent.training.optim import ModuleLR, OptimConfig


@dataclass
class Leaf:
    size: int = 1
    tags: tuple[str, ...] = ()


@dataclass
class Branch:
    leaf: Leaf = field(default_factory=Leaf)
    spare: Leaf | None = None
    legacy: Optional[Leaf] = None
    ratio: float = 0.5


@dataclass
class Root:
    name: str = "root"
    branch: Branch = field(default_factory=Branch)
    betas: tuple[float, float] = (0.9, 0.99)
    extra: dict = field(default_factory=dict)


def test_nested_dataclasses_are_rebuilt():
    """Dicts of nested dataclass fields become those dataclasses, at every depth; missing keys keep defaults."""
    root = from_dict(Root, {"name": "r", "branch": {"leaf": {"size": 3}, "ratio": 0.25}})
    assert root == Root(name="r", branch=Branch(leaf=Leaf(size=3), ratio=0.25))
    assert type(root.branch) is Branch and type(root.branch.leaf) is Leaf


def test_optional_nested_dataclass_is_rebuilt_or_left_none():
    """`X | None` and `Optional[X]` fields: a dict becomes an X, None stays None."""
    branch = from_dict(Branch, {"spare": {"size": 2}, "legacy": {"size": 4}})
    assert branch.spare == Leaf(size=2) and branch.legacy == Leaf(size=4)
    assert from_dict(Branch, {"spare": None, "legacy": None}) == Branch()


def test_lists_become_tuples_where_the_field_is_a_tuple():
    """Lists (what JSON and YAML give) become tuples for tuple fields, also inside nested dataclasses; other
    fields keep their value as is."""
    root = from_dict(Root, {"betas": [0.8, 0.9], "branch": {"leaf": {"tags": ["a", "b"]}}, "extra": {"k": [1]}})
    assert root.betas == (0.8, 0.9) and isinstance(root.betas, tuple)
    assert root.branch.leaf.tags == ("a", "b") and isinstance(root.branch.leaf.tags, tuple)
    assert root.extra == {"k": [1]}


def test_instances_pass_through_unchanged():
    """An instance of the class (at the top or in a nested field) is kept, not copied or rebuilt."""
    root = Root(name="x")
    assert from_dict(Root, root) is root
    leaf = Leaf(size=9)
    assert from_dict(Root, {"branch": {"leaf": leaf}}).branch.leaf is leaf
    branch = Branch()
    assert from_dict(Root, {"branch": branch}).branch is branch


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"nme": "x"}, "", r"^Root: unknown field\(s\) \['nme'\]; known: \['betas', 'branch', 'extra', 'name'\]$"),
        ({"branch": {"leaf": {"size": 1, "colour": "red"}}}, "", r"^branch\.leaf: unknown field\(s\) \['colour'\]; "
         r"known: \['size', 'tags'\]$"),
        ({"branch": {"spare": {"sise": 1}}}, "model", r"^model\.branch\.spare: unknown field\(s\) \['sise'\]; "
         r"known: \['size', 'tags'\]$"),
        ({"branch": {"b": 1, "a": 2}}, "", r"^branch: unknown field\(s\) \['a', 'b'\]; "
         r"known: \['leaf', 'legacy', 'ratio', 'spare'\]$"),
    ],
    ids=["top level", "nested", "under a path prefix", "several, sorted"],
)
def test_unknown_key_names_its_dotted_path_and_the_known_fields(data: dict, path: str, message: str):
    """An unknown key fails with a `ValueError` naming the full dotted path (under the caller's `path`
    prefix, or the class name at the top) and listing the fields that are known there."""
    with pytest.raises(ValueError, match=message):
        from_dict(Root, data, path=path)


def test_to_dict_round_trips_through_json():
    """`to_dict` gives plain data (JSON-serialisable); `from_dict` of it, after JSON, equals the original."""
    branch = Branch(leaf=Leaf(2, ("x",)), spare=Leaf(5), ratio=0.1)
    root = Root(name="n", branch=branch, betas=(0.1, 0.2), extra={"k": 1})
    plain = json.loads(json.dumps(to_dict(root)))
    assert plain["branch"]["spare"] == {"size": 5, "tags": []}
    assert from_dict(Root, plain) == root


def test_a_package_config_round_trips():
    """A real nested config (the optimiser's, betas a tuple) survives to_dict → JSON → from_dict."""
    cfg = OptimConfig(lr=3e-4, betas=(0.8, 0.95), schedule="constant")
    assert from_dict(OptimConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_dataclasses_inside_a_list_field_are_rebuilt():
    """`OptimConfig.lr_scale` (list[ModuleLR]) read back from its plain form holds ModuleLR objects, as
    `optim.param_groups` expects (it reads `m.prefix`, `m.scale`)."""
    cfg = OptimConfig(lr_scale=[ModuleLR("backbone", 0.1)])
    assert from_dict(OptimConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"lr_scale\[0\]: unknown field\(s\) \['prefx'\]"):
        from_dict(OptimConfig, {"lr_scale": [{"prefx": "backbone", "scale": 0.1}]})
