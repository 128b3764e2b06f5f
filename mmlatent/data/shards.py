"""Shard sets: where the shards are, whether the set is whole, and which samples each shard holds.

`expand_shards` turns a spec (a folder, a brace pattern, a `pipe:` or URL pattern) into shard URLs and
refuses a partial set unless told otherwise: a folder must hold the complete `manifest.json` that
`mmlatent data synth|convert` write when they finish (an interrupted conversion has none), naming exactly
the shards that are there, and a local brace pattern must name only files that exist. `manifest_count`
reads the sample count from that manifest.

`shard_keys` lists the sample keys of every shard from its member headers, which the epoch plan needs to
give each rank and worker an exact range of samples (`shard_sizes`), and which show a key that appears
twice (in one shard or in two) as an error before anything trains on it twice. Local shards are read by
seeking past the data, and their keys are cached under `$MMLATENT_CACHE/shard-sizes/`, keyed by path, size
and modification time, so a second run reads one small JSON per folder; remote shards are streamed once
per run. A shard that cannot be read is an error naming it, never a short count. In a multi-process run
the counting happens once, on rank 0, and every rank receives the same result (`shared`), so a transient
read error cannot give two ranks different plans.

The trade-off: a first run over a large local corpus pays one header pass per shard at start (a few
seeks per sample) and keeps every key in the cache, in exchange for exact per-sample plans and
duplicates found at start; remote corpora pay a full read, so a local copy is what keeps start-up fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from braceexpand import braceexpand

from mmlatent.atomic import write_text
from mmlatent.config_io import ConfigError
from mmlatent.data.tar_reader import UnreadableShard, sample_keys
from mmlatent.cache import cache_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST = "manifest.json"
CONVERSION_STATE = ".convert_state.json"
"""What an unfinished `mmlatent data convert` leaves beside its shards (`convert/common.py`)."""


def expand_shards(spec: str, field_name: str, allow_partial: bool = False) -> list[str]:
    """Resolve a shard spec to a sorted list of URLs; raises naming `field_name` when nothing matches or the
    set is partial (see the module docstring) and `allow_partial` is not set."""
    if not spec:
        raise ConfigError(f"{field_name} is empty: give a folder of .tar shards or a brace pattern")
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if urls and not allow_partial:
            _check_complete(Path(spec), urls, field_name)
    elif "://" in spec or spec.startswith("pipe:"):
        urls = list(braceexpand(spec))
    else:
        named = list(braceexpand(spec))
        urls = [u for u in named if os.path.exists(u)]
        absent = [u for u in named if u not in urls]
        if urls and absent:
            what = f"{len(absent)} of its {len(named)} files do not exist, e.g. {absent[0]}"
            if not allow_partial:
                raise ConfigError(f"{field_name}={spec!r}: {what}; fix the pattern, or set "
                                  f"{_allow_field(field_name)}=true to read the {len(urls)} that do")
            log.warning("%s=%r: %s; reading the %d that do", field_name, spec, what, len(urls))
    if not urls:
        raise ConfigError(f"{field_name}={spec!r} matches no shard")
    return urls


def _allow_field(field_name: str) -> str:
    """The option that accepts a partial set, next to the field that names it (`data.train.shards` ->
    `data.train.allow_partial`; a command's `--shards` -> `--allow-partial`)."""
    if field_name.startswith("--"):
        return "--allow-partial"
    return f"{field_name.rsplit('.', 1)[0]}.allow_partial" if "." in field_name else "allow_partial"


def find_manifest(folder: Path) -> tuple[Path, dict, Path] | None:
    """(manifest file, the entry describing `folder`'s shards, the folder its shard paths are relative to):
    a converter's `folder/manifest.json`, or a synthetic set's `parent/manifest.json` with a split entry."""
    for candidate in (folder / MANIFEST, folder.parent / MANIFEST):
        if not candidate.is_file():
            continue
        try:
            manifest = json.loads(candidate.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{candidate} cannot be read: {err}") from None
        split = manifest.get("splits", {}).get(folder.name)
        if split is not None:
            return candidate, split, candidate.parent
        if "written" in manifest:
            return candidate, manifest, candidate.parent
    return None


def _check_complete(folder: Path, urls: list[str], field_name: str) -> None:
    """A folder is whole when no conversion is unfinished there and its manifest names exactly its shards."""
    allow = f"set {_allow_field(field_name)}=true to read the {len(urls)} shard(s) it holds anyway"
    if (folder / CONVERSION_STATE).exists():
        raise ConfigError(f"{field_name}={str(folder)!r} holds an unfinished conversion ({CONVERSION_STATE}, no "
                          f"{MANIFEST}): rerun the same `mmlatent data convert` to finish it, or {allow}")
    found = find_manifest(folder)
    if found is None:
        raise ConfigError(f"{field_name}={str(folder)!r} has no {MANIFEST} (`mmlatent data synth|convert` write it "
                          f"when they finish; an interrupted or failed run leaves none): {allow}")
    path, entry, base = found
    if entry.get("complete") is False:
        raise ConfigError(f"{field_name}={str(folder)!r}: {path} says the set is not complete; {allow}")
    listed = entry.get("shards")
    if listed is None:
        return  # a manifest of counts only: the count is compared when the shards are counted
    named = {os.path.normpath(base / s) for s in listed}
    present = {os.path.normpath(u) for u in urls}
    missing, unlisted = sorted(named - present), sorted(present - named)
    if missing:
        raise ConfigError(f"{field_name}={str(folder)!r}: its manifest {path} names {len(missing)} shard(s) that "
                          f"are missing, e.g. {missing[0]}; {allow}")
    if unlisted:
        raise ConfigError(f"{field_name}={str(folder)!r}: {len(unlisted)} shard(s) are not in its manifest {path}, "
                          f"e.g. {unlisted[0]} (left by another run?); {allow}")


def manifest_count(spec: str) -> int | None:
    """The split's sample count from a `manifest.json` beside the shards (folder or its parent)."""
    found = find_manifest(Path(spec if os.path.isdir(spec) else os.path.dirname(spec) or "."))
    return None if found is None else int(found[1]["written"])


def _cache_file(folder: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:20]
    return cache_dir() / "shard-sizes" / f"{digest}.json"


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _keys_or_error(url: str) -> list[str]:
    try:
        return sample_keys(url)
    except UnreadableShard as err:
        raise ConfigError(str(err)) from None


def _read_all(urls: list[str]) -> list[list[str]]:
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        return list(pool.map(_keys_or_error, urls))


def _local_keys(paths: list[str]) -> dict[str, list[str]]:
    """Keys of local shards, read from and added to the per-folder cache."""
    out: dict[str, list[str]] = {}
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(os.path.abspath(p)), []).append(p)
    for folder, members in by_folder.items():
        file = _cache_file(folder)
        try:
            cached = json.loads(file.read_text())
        except (OSError, ValueError):
            cached = {}

        def entry(p: str) -> list:  # [size, mtime_ns, keys]
            return cached.get(os.path.basename(p), [])

        # an entry of the earlier format ([size, mtime_ns, count]) is read again
        missing = [p for p in members if entry(p)[:2] != _stamp(p) or len(entry(p)) != 3 or not isinstance(entry(p)[2], list)]
        if missing:
            for p, keys in zip(missing, _read_all(missing)):
                cached[os.path.basename(p)] = [*_stamp(p), keys]
            try:  # several processes may write at once: each writes a whole file and renames it
                write_text(file, json.dumps(cached, sort_keys=True))
            except OSError as err:
                log.warning("could not cache shard sizes in %s: %s", file, err)
        for p in members:
            out[p] = entry(p)[2]
    return out


def _check_unique(urls: list[str], keys: list[list[str]]) -> None:
    """A sample key may appear once in a shard set: the plan would train it twice, the teacher cache keeps one."""
    seen: dict[str, tuple[str, int]] = {}
    for url, shard in zip(urls, keys):
        for pos, key in enumerate(shard):
            if key in seen:
                first, at = seen[key]
                raise ConfigError(f"sample key {key!r} appears twice: {first} (sample {at}) and {url} (sample {pos}); "
                                  f"every sample of a shard set needs its own key")
            seen[key] = (url, pos)


def shard_keys(urls: list[str]) -> list[list[str]]:
    """The sample keys of every shard, in the order of `urls`; a key seen twice or a shard that cannot be read
    is a `ConfigError` naming it."""
    local = [u for u in urls if os.path.isfile(u)]
    found = _local_keys(local)
    remote = [u for u in urls if u not in found]
    found.update(zip(remote, _read_all(remote)))
    keys = [found[u] for u in urls]
    _check_unique(urls, keys)
    unreadable = [u for u, k in zip(urls, keys) if not k]
    if unreadable:
        log.warning("%d shard(s) hold no readable sample, e.g. %s", len(unreadable), unreadable[0])
    return keys


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples each shard holds (0 for an empty or wholly damaged one), in the order of `urls` (`shard_keys`)."""
    return [len(k) for k in shard_keys(urls)]


def shared(compute: Callable[[], T], rank: int, broadcast: Callable[[object], object]) -> T:
    """`compute()` on rank 0 only, its result (or its error) handed to every rank by `broadcast`.

    `broadcast(obj)` is a collective every rank calls: it returns rank 0's `obj` (e.g. a Lightning strategy's
    `broadcast(obj, src=0)`). An error on rank 0 is raised on every rank, so none waits for the others.
    """
    result: tuple[str, object] | None = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            result = ("ok", compute())
        except Exception as err:  # noqa: BLE001  (raised again below, after the other ranks heard of it)
            failure = err
            result = ("config" if isinstance(err, ConfigError) else "error", str(err) or repr(err))
    status, value = broadcast(result)
    if failure is not None:
        raise failure
    if status == "config":
        raise ConfigError(value)
    if status == "error":
        raise RuntimeError(f"rank 0 failed while counting the shards: {value}")
    return value
