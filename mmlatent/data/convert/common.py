"""The conversion driver shared by every converter: stream records, convert them in parallel, write
resumable shards, and describe the result in `manifest.json`.

A converter (one file per corpus) says where its records are (`open`, `records`, read in the main
process) and how one record becomes a `RawSample` (`convert`, run in worker processes, which also do the
image work). A record that cannot be converted raises `SampleError`; the driver skips it and counts it
by reason. Converted samples pass `validate_sample` in the worker, so every sample that reaches the writer
is good.

Shards are a pure function of the record order: shard k holds good samples k·S … k·S+S-1. Each shard is
written by `shard_writer.write_shards` (validation, fixed tar headers, atomic `.tmp` rename) into a
staging folder and then renamed into place, after which `.convert_state.json` records how many records
the finished shards used and the skip counts so far. A resumed run reads that state, skips the records
already used (they are read again, but not converted), and continues with the next shard, so its shards
are byte-identical to those of an uninterrupted run. The state also holds the conversion's identity
(source files and revision, every option that changes the bytes); resuming with a different identity is
refused instead of mixing two conversions.

The trade-off of parallelism: records are converted out of order by `workers` processes but collected in
order through a bounded window of pending tasks, so output is deterministic and memory stays bounded,
at the cost of a slow record briefly stalling the writer.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from abc import ABC, abstractmethod
from collections import Counter, deque
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

from tqdm import tqdm

from mmlatent.data.convert.images import ImageFormat, ImageOptions
from mmlatent.data.convert.sources import SourceInfo, parquet_columns_and_rows, parquet_num_rows
from mmlatent.data.sample import SampleError, validate_sample
from mmlatent.data.shard_writer import RawSample, write_shards

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the converted sample layout and manifest, written to the manifest."""

STATE_FILE = ".convert_state.json"
"""Progress of an unfinished conversion, beside its shards."""

STAGING_DIR = ".staging"
"""Where the shard being written lives until it is complete."""

SHARD_PREFIX = "shard"
"""Shards are named `shard-000000.tar`, `shard-000001.tar`, …"""


@dataclass
class ConvertOptions:
    """Output options common to every converter."""

    image_format: ImageFormat = "jpeg"
    """Encoding of the written images (JPEG quality 95, or lossless PNG / WebP)."""
    max_image_size: int = 1024
    """Longest image side in pixels; larger images are shrunk. 0 keeps every size."""
    samples_per_shard: int = 1000
    """Good samples per `.tar` shard (the last shard holds the rest)."""
    workers: int = 2
    """Processes that convert records (image decoding, resizing, encoding), forked from the main process,
    which reads the source and writes the shards; 0 converts in the main process. Output is the same."""
    limit: int | None = None
    """Read only the first N records (a quick look at a corpus); None reads them all."""
    overwrite: bool = False
    """Delete what the output folder holds and start over, instead of resuming."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {self.limit}")
        self.images()  # checks image_format and max_image_size

    def images(self) -> ImageOptions:
        return ImageOptions(format=self.image_format, max_size=self.max_image_size)

    def output(self) -> dict:
        """The options that change the written bytes (part of a conversion's identity)."""
        return {
            "image_format": self.image_format,
            "max_image_size": self.max_image_size,
            "samples_per_shard": self.samples_per_shard,
            "limit": self.limit,
        }


class Converter(ABC):
    """Turns the records of one corpus into `RawSample`s. Subclasses set `name` and `config_class`."""

    name: ClassVar[str]
    """Registry name, also the prefix of sample keys (`zebra_cot-000000042`)."""
    config_class: ClassVar[type]
    """The converter's typed options (a dataclass with a `source` and a `revision` field)."""

    def __init__(self, cfg: Any, images: ImageOptions = ImageOptions()):
        self.cfg = cfg
        self.images = images
        self.source: SourceInfo | None = None

    @abstractmethod
    def open(self) -> SourceInfo:
        """Resolve the source (main process, once); sets and returns `self.source`."""

    @abstractmethod
    def records(self) -> Iterator[Any]:
        """The records in a fixed order (main process). Each must pickle (it is sent to a worker)."""

    @abstractmethod
    def convert(self, record: Any, key: str) -> RawSample:
        """One record as a sample with key `key` (worker process); raises `SampleError` to skip it."""

    def total(self) -> int | None:
        """Number of records if cheaply known (sizes the progress bar)."""
        return None

    def folder_of(self, rel: str) -> str | None:
        """The local folder of source file `rel` (where an HF Image struct's relative `path` points), or None
        for a file streamed from the Hub."""
        url = self.source.url(rel)
        return None if url.startswith("hf://") else str(Path(url).parent)

    def key(self, index: int) -> str:
        return f"{self.name}-{index:09d}"

    def parquet_records(self, required: tuple[str, ...], what: str) -> Iterator[tuple[str, int, dict]]:
        """(file, row, row dict) of every row of the source's parquet files, in order; a file without one of
        the `required` columns is an error naming the column (it is not "a `what` file")."""
        for rel in self.source.files:
            columns, rows = parquet_columns_and_rows(self.source.url(rel))
            missing = [c for c in required if c not in columns]
            if missing:
                raise ValueError(f"{self.source.url(rel)}: no column {missing[0]!r} (columns: {columns}); is this {what}?")
            for row, data in enumerate(rows):
                yield rel, row, data

    def parquet_total(self) -> int | None:
        """Rows of the source's parquet files, from their footers."""
        return parquet_num_rows(self.source)

    def identity(self, options: ConvertOptions) -> dict:
        """What must match for a resumed conversion to continue this one."""
        assert self.source is not None, "open() first"
        return {
            "format_version": FORMAT_VERSION,
            "converter": self.name,
            "source": self.source.describe(),
            # the revision asked for is left out: `source` holds the commit it resolved to
            "converter_options": {k: v for k, v in asdict(self.cfg).items() if k != "revision"},
            "output_options": options.output(),
        }


def letter(i: int) -> str:
    """Option letter of index `i` (0 -> "A")."""
    return chr(ord("A") + i)


def options_block(choices: list[str]) -> str:
    """Multiple-choice options as `A. first` lines (the ScienceQA and MMMU prompts)."""
    return "\n".join(f"{letter(i)}. {c}" for i, c in enumerate(choices))


# ---------------------------------------------------------------- worker side

_WORKER: Converter | None = None


def _init_worker(converter: Converter) -> None:
    global _WORKER
    _WORKER = converter


def _convert_one(converter: Converter, index: int, record: Any) -> RawSample | tuple[str, str]:
    """The sample of record `index`, validated; or (reason, detail) when it is skipped."""
    key = converter.key(index)
    try:
        sample = converter.convert(record, key)
        validate_sample(sample.meta, sample.images.keys(), key=key)
        sample.image_ext = converter.images.format
        return sample
    except SampleError as err:  # SampleError does not pickle (custom __init__): send plain strings
        return err.reason, err.detail


def _convert_batch(batch: list[tuple[int, Any]]) -> list[tuple[int, RawSample | tuple[str, str]]]:
    assert _WORKER is not None
    return [(index, _convert_one(_WORKER, index, record)) for index, record in batch]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def ordered_map(converter: Converter, items: Iterable[tuple[int, Any]], workers: int, batch: int = 2,
                window: int = 4) -> Iterator[tuple[int, RawSample | tuple[str, str]]]:
    """Convert (index, record) pairs in `workers` processes; results come back in input order.

    At most `window × workers` batches are in flight, so a fast reader never piles records up in memory.
    """
    if workers == 0:
        for index, record in items:
            yield index, _convert_one(converter, index, record)
        return
    # fork: workers inherit the imported modules (spawn would re-import torch via webdataset, seconds per
    # worker); the pool starts before any record is read, so no reader thread is mid-operation at the fork
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(converter,)) as pool:
        pending: deque = deque()
        for chunk in _batched(items, batch):
            pending.append(pool.apply_async(_convert_batch, (chunk,)))
            if len(pending) >= window * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---------------------------------------------------------------- driver


@dataclass
class _Progress:
    """What the finished shards hold: the resumable state."""

    shards: list[str]
    records: int
    written: int
    skipped: Counter

    def to_json(self, identity: dict) -> dict:
        return {"identity": identity, "shards": self.shards, "records": self.records, "written": self.written,
                "skipped": dict(sorted(self.skipped.items()))}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}")
    return out


def _clear(out: Path) -> None:
    for path in [*out.glob(f"{SHARD_PREFIX}-*.tar"), *out.glob(f"{SHARD_PREFIX}-*.tar.tmp"),
                 out / STATE_FILE, out / "manifest.json"]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)


def _start(out: Path, identity: dict, overwrite: bool) -> _Progress | dict:
    """The progress to resume from, or the manifest of a finished identical conversion."""
    if overwrite:
        _clear(out)
    manifest_path, state_path = out / "manifest.json", out / STATE_FILE
    for path in (state_path, manifest_path):
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            old = data.get("identity", {})
            if old != identity:
                diff = "; ".join(_identity_diff(old, identity)) or "unknown"
                raise ValueError(f"{out} holds another conversion ({diff}); pass --overwrite true to start over")
            if path == manifest_path:
                return data
            progress = _Progress(list(data["shards"]), int(data["records"]), int(data["written"]),
                                 Counter(data["skipped"]))
            missing = [s for s in progress.shards if not (out / s).exists()]
            if missing:
                raise ValueError(f"{out}: finished shards {missing[:3]} are gone; "
                                 f"pass --overwrite true to start over")
            return progress
    if any(out.glob(f"{SHARD_PREFIX}-*.tar")):
        raise ValueError(f"{out} already holds shards of unknown origin; pass --overwrite true to start over")
    return _Progress([], 0, 0, Counter())


def _take(it: Iterator, n: int) -> Iterator:
    """The next `n` items of `it`, never pulling an item more."""
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def run_conversion(converter: Converter, out_dir: str | os.PathLike, options: ConvertOptions) -> dict:
    """Convert the converter's corpus into `out_dir/shard-*.tar` + `manifest.json`; return the manifest.

    Resumes an interrupted conversion of the same identity; returns at once if it is already complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    converter.images = options.images()
    source = converter.open()
    identity = converter.identity(options)
    progress = _start(out, identity, options.overwrite)
    if isinstance(progress, dict):
        log.info("%s: conversion already complete (%d samples)", out, progress["written"])
        return progress
    for stale in out.glob(f"{SHARD_PREFIX}-*.tar"):  # written after the last saved state: rewritten below
        if stale.name not in progress.shards:
            stale.unlink()
    staging = out / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)

    start, stop = progress.records, options.limit
    records = islice(enumerate(converter.records()), start, stop)
    total = converter.total()
    total = min(total, stop) if total is not None and stop is not None else (total if total is not None else stop)
    bar = tqdm(total=total, initial=start, desc=f"convert {converter.name}", unit="record",
               disable=not options.progress, dynamic_ncols=True)
    position = {"records": start}  # records whose result the writer has consumed

    def good_samples() -> Iterator[RawSample]:
        for index, result in ordered_map(converter, records, options.workers):
            position["records"] = index + 1
            bar.update(1)
            if isinstance(result, tuple):
                progress.skipped[result[0]] += 1
                log.debug("skipping record %d: %s (%s)", index, *result)
                if options.progress:
                    bar.set_postfix(written=progress.written, skipped=sum(progress.skipped.values()), refresh=False)
                continue
            yield result

    samples = good_samples()
    try:
        while True:
            stats = write_shards(_take(samples, options.samples_per_shard), staging, prefix=SHARD_PREFIX,
                                 samples_per_shard=options.samples_per_shard, image_format=options.image_format,
                                 progress=False)
            progress.skipped.update(stats.skipped)  # write-time rejections (none expected: workers validate)
            if not stats.shards:
                break
            name = f"{SHARD_PREFIX}-{len(progress.shards):06d}.tar"
            os.replace(stats.shards[0], out / name)
            progress.shards.append(name)
            progress.written += stats.written
            progress.records = position["records"]
            _write_json(out / STATE_FILE, progress.to_json(identity))
            if options.progress:
                bar.set_postfix(written=progress.written, skipped=sum(progress.skipped.values()), refresh=False)
    finally:
        samples.close()  # stops the worker pool when interrupted
        bar.close()
    progress.records = position["records"]
    manifest = {
        **progress.to_json(identity),
        "format_version": FORMAT_VERSION,
        "converter": converter.name,
        "source": source.describe(),
        "options": {**asdict(converter.cfg), **asdict(options)},
        "complete": True,
    }
    _write_json(out / "manifest.json", manifest)
    (out / STATE_FILE).unlink(missing_ok=True)
    log.info("%s: %d samples in %d shards from %d records; skipped %s", out, progress.written,
             len(progress.shards), progress.records, dict(progress.skipped) or "none")
    shutil.rmtree(staging, ignore_errors=True)
    return manifest
