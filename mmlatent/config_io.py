"""Typed configs to and from plain dicts.

Checkpoints store hyper-parameters as plain dicts (so they load with `torch.load(weights_only=True)`), and
`LightningModule.load_from_checkpoint` hands those dicts back to `__init__`. `from_dict` rebuilds the typed
dataclass tree from them, recursing into nested dataclasses, optional fields, lists and tuples, and it names the
offending field when a key is unknown, so an old or hand-edited checkpoint fails with a clear message. A field a
config class has retired (its `RETIRED` map: old name -> where the setting went) is dropped instead, so
checkpoints and exports of older versions still load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that cannot work, found when a run starts (a shard path that matches nothing, a value out of
    range). The message names the field; `mmlatent` prints it as one line instead of a traceback."""


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """`cls(**data)` with nested dataclasses rebuilt; `data` may already be a `cls`."""
    if isinstance(data, cls) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    retired = getattr(cls, "RETIRED", {})  # {old field: where it went}: an old config's key is dropped
    data = {k: v for k, v in data.items() if k not in retired or k in names}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path or cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):  # the first dataclass member of an optional/union that fits
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, path)
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)] if item is not None else list(value)
        return tuple(items) if origin is tuple else items
    return value


def to_dict(cfg: Any) -> dict:
    """The plain-dict form of a dataclass config (what checkpoints store)."""
    return dataclasses.asdict(cfg)
