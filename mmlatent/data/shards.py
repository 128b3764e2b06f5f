"""Shard sets: where the shards are, how many samples the set holds, and how many each shard holds.

`expand_shards` turns a spec (a folder, a brace pattern, a `pipe:` or URL pattern) into shard URLs;
`manifest_count` reads the sample count the writers put in `manifest.json`. `shard_sizes` counts the
samples of every shard, which the epoch plan needs to give each rank and worker an exact range of
samples. Local shards are counted from their member headers (seeking past the data) and the counts are
cached under `$MMLATENT_CACHE/shard-sizes/`, keyed by path, size and modification time, so a second run
(or a second rank) reads one small JSON per folder. Remote shards (`pipe:`, URLs) are streamed once per
run to be counted.

The trade-off: a first run over a large local corpus pays one header pass per shard at start (a few
seeks per sample) in exchange for exact per-sample plans; remote corpora pay a full read, so for those
a local copy of the shard list's counts (a warm cache) is what keeps start-up fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from braceexpand import braceexpand

from mmlatent.atomic import write_text
from mmlatent.config_io import ConfigError
from mmlatent.data.tar_reader import count_samples
from mmlatent.tokens import cache_dir

log = logging.getLogger(__name__)


def expand_shards(spec: str, field_name: str) -> list[str]:
    """Resolve a shard spec to a sorted list of URLs; raises naming `field_name` when nothing matches."""
    if not spec:
        raise ConfigError(f"{field_name} is empty: give a folder of .tar shards or a brace pattern")
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "://" in spec or spec.startswith("pipe:"):
        urls = list(braceexpand(spec))
    else:
        urls = [u for u in braceexpand(spec) if os.path.exists(u)]
    if not urls:
        raise ConfigError(f"{field_name}={spec!r} matches no shard")
    return urls


def manifest_count(spec: str) -> int | None:
    """The split's sample count from a `manifest.json` beside the shards (folder or its parent)."""
    folder = Path(spec if os.path.isdir(spec) else os.path.dirname(spec) or ".")
    for candidate in (folder / "manifest.json", folder.parent / "manifest.json"):
        if candidate.exists():
            manifest = json.loads(candidate.read_text())
            split = manifest.get("splits", {}).get(folder.name)
            if split is not None:
                return int(split["written"])
            if "written" in manifest:
                return int(manifest["written"])
    return None


def _cache_file(folder: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:20]
    return cache_dir() / "shard-sizes" / f"{digest}.json"


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _local_sizes(paths: list[str]) -> dict[str, int]:
    """Counts of local shards, read from and added to the per-folder cache."""
    out: dict[str, int] = {}
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(os.path.abspath(p)), []).append(p)
    for folder, members in by_folder.items():
        file = _cache_file(folder)
        try:
            cached = json.loads(file.read_text())
        except (OSError, ValueError):
            cached = {}
        missing = [p for p in members if cached.get(os.path.basename(p), [None])[:2] != _stamp(p)]
        if missing:
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                counts = list(pool.map(count_samples, missing))
            for p, n in zip(missing, counts):
                cached[os.path.basename(p)] = [*_stamp(p), n]
            try:  # several ranks may write at once: each writes a whole file and renames it
                write_text(file, json.dumps(cached, sort_keys=True))
            except OSError as err:
                log.warning("could not cache shard sizes in %s: %s", file, err)
        for p in members:
            out[p] = cached[os.path.basename(p)][2]
    return out


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples each shard holds (0 for an unreadable one), in the order of `urls`."""
    local = [u for u in urls if os.path.isfile(u)]
    sizes = _local_sizes(local)
    remote = [u for u in urls if u not in sizes]
    if remote:
        with ThreadPoolExecutor(max_workers=min(8, len(remote))) as pool:
            sizes.update(zip(remote, pool.map(count_samples, remote)))
    unreadable = [u for u in urls if sizes[u] == 0]
    if unreadable:
        log.warning("%d shard(s) hold no readable sample, e.g. %s", len(unreadable), unreadable[0])
    return [sizes[u] for u in urls]
