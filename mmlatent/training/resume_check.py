"""A resume continues the run it resumes: `--ckpt_path` with other stage or model settings stops at start.

Lightning's `--ckpt_path` loads a checkpoint's weights, optimiser and loop counters into the module the
command built from its own config, whatever that config says: a stage-1 config resumed from a stage-3
checkpoint ran stage 1's losses on stage 3's weights (or nothing at all, its step counter already past the
end), and a different `model.vlm` preset was silently replaced by the checkpoint's weights. The module
compares the settings the checkpoint was written with (its hyper-parameters, read back through the same
typed configs, so a checkpoint from before a new field gets its default) with the command's when Lightning
restores it, before any step, and stops with one line naming each difference and both values.
`differences` is generic over nested settings dicts, for any other settings a checkpoint carries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mmlatent.config_io import ConfigError, from_dict

MAX_NAMED = 3
"""Differences spelt out with both values; the rest are only named."""


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def differences(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every leaf where two nested settings dicts differ, the
    shallower keys first."""
    saved, current = _plain(saved), _plain(current)
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [(prefix, saved, current)]
    out = []
    for key in [*saved, *(k for k in current if k not in saved)]:
        out += differences(saved.get(key), current.get(key), f"{prefix}.{key}")
    return sorted(out, key=lambda d: d[0].count("."))


def check_resume(where: str, saved: dict, current: dict, sections: dict[str, tuple[str, type]]) -> None:
    """Raise `ConfigError` when the checkpoint's settings (`saved`, its hyper-parameters) differ from the
    command's (`current`) in any of `sections`: hyper-parameter name -> (config key it comes from, its typed
    config class)."""
    found = []
    for name, (key, cls) in sections.items():
        try:  # through the typed config, so a field added since the checkpoint was written takes its default
            theirs = dataclasses.asdict(from_dict(cls, saved.get(name, {}), path=key))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: its {key} settings cannot be read by this mmlatent ({err})") from err
        found += differences(theirs, current[name], key)
    if not found:
        return
    named = "; ".join(f"{k} is {a!r} there, {b!r} here" for k, a, b in found[:MAX_NAMED])
    more = [k for k, _, _ in found[MAX_NAMED:]]
    rest = f" ({len(more)} more differ: {', '.join(more[:5])}{', …' if len(more) > 5 else ''})" if more else ""
    raise ConfigError(
        f"{where} was written with other settings than this command's: {named}{rest}. Resume with that run's "
        f"config, or start a new run from its weights with --model.init_from"
    )
