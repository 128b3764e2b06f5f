"""The conversion driver shared by every converter: stream records, convert them in parallel, write
resumable shards, and describe the result in `manifest.json`.

A converter (one file per corpus) says where its records are (`open`, `records`, read in the main
process), what key each record's sample gets (`key`, main process), and how one record becomes a
`RawSample` (`convert`, run in worker processes, which also do the image work). A record that cannot be
converted raises `SampleError`; the driver skips it, counts it by reason and writes one line about it to
`skips.jsonl` (`skiplog`). Converted samples pass `validate_sample` in the worker, so every sample that
reaches the writer is good.

Sample keys are unique across a whole corpus and stable between runs: a converter derives them from its
name, the subset or category, and the record's own id (or its file and row), never from a counter that
restarts with each `--files` conversion, so shard sets converted one subset at a time can be read, and
teacher-cached, together. A key that still repeats within a conversion gets `-2`, `-3`, … appended.

A conversion that writes no sample fails (`ConversionError`, a non-zero exit from the command) with the
most common skip reason and an example record, and a failed conversion leaves no empty output folder and
no staging folder behind.

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
import re
import shutil
from abc import ABC, abstractmethod
from collections import Counter, deque
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterable, Iterator, NamedTuple

from tqdm import tqdm

from mmlatent.atomic import move, write_json
from mmlatent.data.convert.folder_lock import FolderInUse, folder_lock
from mmlatent.data.convert.images import ImageFormat, ImageOptions
from mmlatent.data.convert.skiplog import SKIPS_FILE, Skip, SkipLog
from mmlatent.data.convert.input_files import SourceInfo, parquet_columns_and_rows, parquet_num_rows
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

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
"""Characters a key part may not hold (webdataset splits member names at dots; tar paths at slashes)."""


class ConversionError(ValueError):
    """A conversion that ran but produced nothing usable (no records, or every record skipped)."""


class Record(NamedTuple):
    """One source record and where it comes from."""

    file: str
    """Source file, relative to the source root."""
    row: int
    """Row of a parquet file, or index of the record in a JSON file."""
    data: Any
    """The record itself (a parquet row dict, a JSON value)."""


def make_key(*parts: object) -> str:
    """A sample key from its parts, joined with `-`; characters other than letters, digits, `_` and `-` become
    `_` (`("zebra_cot", "2D Visual Reasoning - Visual Search", "train-00000", 7)` ->
    `zebra_cot-2D_Visual_Reasoning_-_Visual_Search-train-00000-7`)."""
    return "-".join(_KEY_UNSAFE.sub("_", str(p)).strip("_") or "_" for p in parts)


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
    """Registry name, also the first part of sample keys."""
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
    def records(self) -> Iterator[Record]:
        """The records in a fixed order (main process). Each must pickle (it is sent to a worker)."""

    @abstractmethod
    def key(self, record: Record) -> str:
        """The sample key of `record` (main process): unique across the corpus, the same in every run; build
        it with `make_key(self.name, …)`."""

    @abstractmethod
    def convert(self, record: Record, key: str) -> RawSample:
        """One record as a sample with key `key` (worker process); raises `SampleError` to skip it."""

    def hint(self, reason: str) -> str:
        """Advice added to the error of a conversion whose records were all skipped, mostly for `reason`."""
        return ""

    def total(self) -> int | None:
        """Number of records if cheaply known (sizes the progress bar)."""
        return None

    def folder_of(self, rel: str) -> str | None:
        """The local folder of source file `rel` (where an HF Image struct's relative `path` points), or None
        for a file streamed from the Hub."""
        url = self.source.url(rel)
        return None if url.startswith("hf://") else str(Path(url).parent)

    def folder_name(self, rel: str) -> str:
        """Name of the folder holding source file `rel` (a Zebra-CoT category, a Monet subset), also when the
        source is that single file; "" for a Hub file at the repository root."""
        parent = PurePosixPath(rel).parent.name
        if parent or self.source.root.startswith("hf://"):
            return parent
        return Path(self.source.root).name

    def parquet_records(self, required: tuple[str, ...], what: str) -> Iterator[Record]:
        """(file, row, row dict) of every row of the source's parquet files, in order; a file without one of
        the `required` columns is an error naming the column (it is not "a `what` file")."""
        for rel in self.source.files:
            columns, rows = parquet_columns_and_rows(self.source.url(rel))
            missing = [c for c in required if c not in columns]
            if missing:
                raise ValueError(f"{self.source.url(rel)}: no column {missing[0]!r} (columns: {columns}); is this {what}?")
            for row, data in enumerate(rows):
                yield Record(rel, row, data)

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


# ---------------------------------------------------------------- worker side

_WORKER: Converter | None = None


def _init_worker(converter: Converter) -> None:
    global _WORKER
    _WORKER = converter


def _convert_one(converter: Converter, key: str, record: Record) -> RawSample | Skip:
    """The sample of `record`, validated; or a `Skip` saying why not."""
    try:
        sample = converter.convert(record, key)
        validate_sample(sample.meta, sample.images.keys(), key=key)
        sample.image_ext = converter.images.format
        return sample
    except SampleError as err:  # SampleError does not pickle (custom __init__): send plain fields
        return Skip(key, record.file, record.row, err.reason, err.path, err.detail)


def _convert_batch(batch: list[tuple[int, str, Record]]) -> list[tuple[int, RawSample | Skip]]:
    assert _WORKER is not None
    return [(index, _convert_one(_WORKER, key, record)) for index, key, record in batch]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def ordered_map(converter: Converter, items: Iterable[tuple[int, str, Record]], workers: int, batch: int = 2,
                window: int = 4) -> Iterator[tuple[int, RawSample | Skip]]:
    """Convert (index, key, record) triples in `workers` processes; results come back in input order.

    At most `window × workers` batches are in flight, so a fast reader never piles records up in memory.
    """
    if workers == 0:
        for index, key, record in items:
            yield index, _convert_one(converter, key, record)
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
    skips_bytes: int = 0
    """Size of `skips.jsonl` when the last shard was finished."""

    def to_json(self, identity: dict) -> dict:
        return {"identity": identity, "shards": self.shards, "records": self.records, "written": self.written,
                "skipped": dict(sorted(self.skipped.items())), "skips_bytes": self.skips_bytes}


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
    for path in [*out.glob(f"{SHARD_PREFIX}-*.tar"), *out.glob(f".{SHARD_PREFIX}-*.tar.tmp-*"),
                 out / STATE_FILE, out / "manifest.json", out / SKIPS_FILE]:
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
                                 Counter(data["skipped"]), int(data.get("skips_bytes", 0)))
            missing = [s for s in progress.shards if not (out / s).exists()]
            if missing:
                raise ValueError(f"{out}: finished shards {missing[:3]} are gone; "
                                 f"pass --overwrite true to start over")
            return progress
    if any(out.glob(f"{SHARD_PREFIX}-*.tar")):
        raise ValueError(f"{out} already holds shards of unknown origin; pass --overwrite true to start over")
    return _Progress([], 0, 0, Counter())


def _keyed(converter: Converter, start: int, stop: int | None) -> Iterator[tuple[int, str, Record]]:
    """(index, key, record) of the records from `start` on. Records before `start` (used by finished shards)
    are read and keyed but not yielded, so a repeated key is told apart the same way in a resumed run."""
    seen: set[str] = set()
    repeats = 0
    for index, record in enumerate(islice(converter.records(), stop)):
        base = key = converter.key(record)
        n = 1
        while key in seen:
            n += 1
            key = f"{base}-{n}"
        repeats += n > 1
        seen.add(key)
        if index >= start:
            yield index, key, record
    if repeats:
        log.warning("%d records repeat another record's key (the same id twice); they got a -2, -3, … suffix",
                    repeats)


def _clean_failed(out: Path, created: bool) -> None:
    """After a failed or interrupted conversion: no staging folder, no empty `skips.jsonl`, and no output
    folder if this run created it and nothing is in it (a resumable state and its shards stay)."""
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    skips = out / SKIPS_FILE
    if skips.exists() and skips.stat().st_size == 0:
        skips.unlink()
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _nothing_written(converter: Converter, progress: _Progress, skips: SkipLog, options: ConvertOptions) -> str:
    """The error of a conversion that wrote no sample: why, with an example record."""
    files = ", ".join(converter.source.files[:3]) + (" …" if len(converter.source.files) > 3 else "")
    if progress.records == 0:
        why = "--limit is 0" if options.limit == 0 else "is a file empty?"
        return f"wrote no samples: the source has no records ({files}; {why})"
    reason, n = progress.skipped.most_common(1)[0]
    message = (f"wrote no samples: all {progress.records} records were skipped, most often for {reason} "
               f"({n} of {progress.records})")
    example = skips.examples.get(reason)
    if example is not None:
        message += f"; e.g. record {example.key} ({example.file}, row {example.row}): {example.detail}"
    hint = converter.hint(reason)
    return message + (f". {hint}" if hint else "") + f". One line per skipped record: {skips.path}"


def run_conversion(converter: Converter, out_dir: str | os.PathLike, options: ConvertOptions) -> dict:
    """Convert the converter's corpus into `out_dir/shard-*.tar` + `manifest.json` (+ `skips.jsonl`); return
    the manifest. Raises `ConversionError` when no sample could be written.

    Resumes an interrupted conversion of the same identity; returns at once if it is already complete. A
    folder another conversion is writing is refused (`FolderInUse`) and left untouched.
    """
    out = Path(out_dir)
    created = not out.exists()
    try:
        converter.images = options.images()
        converter.open()
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out):  # one conversion at a time in `out`
            identity = converter.identity(options)
            progress = _start(out, identity, options.overwrite)
            if isinstance(progress, dict):
                log.info("%s: conversion already complete (%d samples)", out, progress["written"])
                return progress
            return _convert(converter, out, options, identity, progress)
    except FolderInUse:
        raise  # the folder is the other conversion's: leave it as it is
    except BaseException:
        _clean_failed(out, created)
        raise


def _convert(converter: Converter, out: Path, options: ConvertOptions, identity: dict, progress: _Progress) -> dict:
    """Write the shards from `progress` on, then the manifest."""
    for stale in out.glob(f"{SHARD_PREFIX}-*.tar"):  # written after the last saved state: rewritten below
        if stale.name not in progress.shards:
            stale.unlink()
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    skips = SkipLog(out / SKIPS_FILE, progress.skips_bytes)
    try:
        _write(converter, out, options, identity, progress, skips)
        if progress.written == 0:
            raise ConversionError(_nothing_written(converter, progress, skips, options))
    finally:
        skips.close()
    manifest = {
        **{k: v for k, v in progress.to_json(identity).items() if k != "skips_bytes"},
        "format_version": FORMAT_VERSION,
        "converter": converter.name,
        "source": converter.source.describe(),
        "options": {**asdict(converter.cfg), **asdict(options)},
        "skips_file": SKIPS_FILE,
        "complete": True,
    }
    write_json(out / "manifest.json", manifest)
    (out / STATE_FILE).unlink(missing_ok=True)
    n_skipped = sum(progress.skipped.values())
    log.info("%s: %d samples in %d shards from %d records; skipped %d %s%s", out, progress.written,
             len(progress.shards), progress.records, n_skipped, dict(progress.skipped) or "",
             f" (one line each in {out / SKIPS_FILE})" if n_skipped else "")
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    return manifest


def _write(converter: Converter, out: Path, options: ConvertOptions, identity: dict, progress: _Progress,
           skips: SkipLog) -> None:
    """Convert the records after `progress` and write them shard by shard, saving the state after each."""
    staging = out / STAGING_DIR
    start, stop = progress.records, options.limit
    total = converter.total()
    total = min(total, stop) if total is not None and stop is not None else (total if total is not None else stop)
    bar = tqdm(total=total, initial=start, desc=f"convert {converter.name}", unit="record",
               disable=not options.progress, dynamic_ncols=True)
    position = {"records": start}  # records whose result the writer has consumed

    def good_samples() -> Iterator[RawSample]:
        for index, result in ordered_map(converter, _keyed(converter, start, stop), options.workers):
            position["records"] = index + 1
            bar.update(1)
            if isinstance(result, Skip):
                progress.skipped[result.reason] += 1
                skips.add(result)
                log.debug("skipping record %d: %s (%s)", index, result.reason, result.detail)
                if options.progress:
                    bar.set_postfix(written=progress.written, skipped=sum(progress.skipped.values()), refresh=False)
                continue
            yield result

    samples = good_samples()
    try:
        while True:
            stats = write_shards(islice(samples, options.samples_per_shard), staging, prefix=SHARD_PREFIX,
                                 samples_per_shard=options.samples_per_shard, image_format=options.image_format,
                                 progress=False)
            progress.skipped.update(stats.skipped)  # write-time rejections (none expected: workers validate)
            if not stats.shards:
                break
            name = f"{SHARD_PREFIX}-{len(progress.shards):06d}.tar"
            move(stats.shards[0], out / name, durable=True)
            progress.shards.append(name)
            progress.written += stats.written
            progress.records = position["records"]
            progress.skips_bytes = skips.offset()
            write_json(out / STATE_FILE, progress.to_json(identity))
            if options.progress:
                bar.set_postfix(written=progress.written, skipped=sum(progress.skipped.values()), refresh=False)
    finally:
        samples.close()  # stops the worker pool when interrupted
        bar.close()
    progress.records = position["records"]
