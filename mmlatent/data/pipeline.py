"""The streaming shard reader: one list of webdataset stages from shard URLs to typed batches.

Each stage says what is true after it. Bad data never stops a run and is never lost silently: a tar that
cannot be read, an undecodable image, a sample that breaks the format or does not fit the sequence limit
is skipped and counted by reason in the worker's `SkipCounter`; the counts ride along on the next batch
(`Batch.skipped`) to the trainer, which logs them per epoch. The trade-off: counts arrive with a delay of
one batch, in exchange for needing no shared memory between worker processes.

Equal steps on every rank: the per-worker stream never runs dry (it loops over its shards, reshuffled
per pass), and `EpochLoader` cuts each rank's epoch at the same number of batches.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
import tarfile
from collections import Counter
from typing import Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from mmlatent.data.batch import Batch, ProcessedSample
from mmlatent.data.sample import IMAGE_EXTENSIONS, SampleError, validate_sample
from mmlatent.data.tar_reader import DamagedTar, tar_samples

log = logging.getLogger(__name__)

# wds.DataPipeline defines __len__; Lightning then warns that workers may duplicate data. Here every worker
# reads its own shard slice (split_by_worker) and `EpochLoader` sets the epoch length, so it does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class SkipCounter:
    """Counts skipped samples by reason inside one worker; `drain` hands over and resets the counts."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.seen = 0
        """Raw samples read so far (good or bad); lets the shard loop notice a pass that read nothing."""

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("skipped sample (%s): %s", reason, detail)

    def count_raw(self, src: Iterable[dict]) -> Iterator[dict]:
        for raw in src:
            self.seen += 1
            yield raw

    def drain(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for errors while reading tars: count and go on."""
        if isinstance(exn, DamagedTar):
            reason = exn.reason
        elif isinstance(exn, (tarfile.TarError, EOFError, OSError)):
            reason = "corrupt_tar"
        else:
            reason = "read_error"
        self.add(reason, repr(exn))
        return True


def decode_samples(src: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Raw tar members -> {"key", "url", "meta", "images": {ref: RGB PIL image}}, validated.

    After this stage every sample's JSON is parsed, every image decoded, and the format (DESIGN §2) holds.
    """
    import json

    for raw in src:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        where = f"{url}:{key}"
        if "json" not in raw:
            counter.add("missing_json", where)
            continue
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            counter.add("bad_json", f"{where}: {err}")
            continue
        images = {}
        try:
            for name, value in raw.items():
                ref, _, ext = name.rpartition(".")
                if ext.lower() in IMAGE_EXTENSIONS and ref:
                    images[ref] = _decode_image(value)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            counter.add("bad_image", f"{where}.{name}: {err}")
            continue
        try:
            validate_sample(meta, images.keys(), key=key)
        except SampleError as err:
            counter.add(err.reason, f"{where}: {err.detail}")
            continue
        yield {"key": key, "url": url, "meta": meta, "images": images}


def _decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force the decode here so a truncated file fails in this stage
    return img.convert("RGB")


def process_samples(
    src: Iterable[dict], processor: Callable[[dict], ProcessedSample], counter: SkipCounter
) -> Iterator[ProcessedSample]:
    """Decoded samples -> token ids, labels, weights and image tensors (a stage's layout)."""
    for sample in src:
        try:
            yield processor(sample)
        except SampleError as err:
            counter.add(err.reason, f"{sample['url']}:{sample['key']}: {err.detail}")
        except (KeyError, ValueError, TypeError) as err:
            counter.add("process_error", f"{sample['url']}:{sample['key']}: {err!r}")


def attach_skips(src: Iterable[Batch], counter: SkipCounter) -> Iterator[Batch]:
    """Put the worker's skip counts since the previous batch on each batch."""
    for batch in src:
        batch.skipped = counter.drain()
        yield batch


class ShardStream(wds.DataPipeline):
    """Per-rank, per-worker stream of batches from WebDataset shards.

    `resampled=False` (default): each worker loops over its own slice of the shard list, reshuffled every
    pass, so it never runs dry. `resampled=True`: shards are drawn with replacement (infinite streams).
    """

    def __init__(
        self,
        urls: list[str],
        processor: Callable[[dict], ProcessedSample],
        collate_fn: Callable[[list[ProcessedSample]], Batch],
        batch_size: int,
        *,
        resampled: bool = False,
        shuffle_buffer: int = 500,
        seed: int = 0,
        loop: bool = True,
        partial_batches: bool = False,
    ):
        """`loop=False` reads each shard once; `partial_batches=True` keeps a short last batch (one pass over
        every sample, e.g. to precompute teacher states)."""
        self.urls, self.seed, self.epoch, self.resampled, self.loop = urls, seed, 0, resampled, loop
        self.processor = processor
        self.counter = SkipCounter()
        shuffle = shuffle_buffer > 0
        super().__init__(
            # shard URLs for this rank and worker (resampled: infinite draws, independent per worker)
            wds.ResampledShards(urls, seed=seed, deterministic=True) if resampled else self._shard_passes,
            # tar bytes -> raw samples grouped by key; unreadable tars counted
            lambda src: tar_samples(src, handler=self.counter.tar_handler),
            # (the same, counted: lets the shard loop notice a pass that read nothing)
            lambda src: self.counter.count_raw(src),
            # raw samples in a locally shuffled order
            *([lambda src: self._shuffle(src, shuffle_buffer)] if shuffle else []),
            # parsed, decoded and validated samples
            lambda src: decode_samples(src, self.counter),
            # token ids / labels / weights / pixel tensors of the stage's layout
            lambda src: process_samples(src, processor, self.counter),
            # padded typed batches
            wds.batched(batch_size, collation_fn=collate_fn, partial=partial_batches),
            # batches carrying the skip counts
            lambda src: attach_skips(src, self.counter),
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.processor, "set_epoch"):  # e.g. the Coconut curriculum grows with the epoch
            self.processor.set_epoch(epoch)

    def _worker_seed(self, *extra: int) -> int:
        """A seed unique to (seed, epoch, rank, worker, *extra) and the same on every run."""
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return hash((self.seed, self.epoch, rank, worker, *extra)) & 0xFFFFFFFF

    def _shuffle(self, src: Iterable[dict], bufsize: int) -> Iterator[dict]:
        return wds.shuffle(bufsize, initial=min(100, bufsize), seed=self._worker_seed())(src)

    def _shard_passes(self) -> Iterator[dict]:
        """This rank's and worker's shards, reshuffled every pass; endless when `loop`.

        A pass that reads no sample at all (every shard unreadable) ends the stream instead of spinning.
        """
        rank_urls = list(wds.split_by_node([{"url": u} for u in self.urls]))
        mine = [d["url"] for d in wds.split_by_worker(rank_urls)]
        passes = 0
        while mine:
            seen = self.counter.seen
            order = list(mine)
            random.Random(self._worker_seed(passes)).shuffle(order)
            yield from ({"url": u} for u in order)
            passes += 1
            if not self.loop or self.counter.seen == seen:
                return


class EpochLoader:
    """A DataLoader over a `ShardStream` cut at exactly `batches` batches per epoch on every rank.

    Lightning calls `sampler.set_epoch(epoch)` before each epoch; here the "sampler" is this object, which
    forwards the epoch to the stream so every epoch reshuffles shards differently (the workers receive a
    fresh copy of the stream at each epoch's start).
    """

    def __init__(self, stream: ShardStream, batches: int, num_workers: int):
        self.stream = stream
        self.batches = batches
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        # what Lightning inspects on a loader: an iterable dataset (so it never injects a sampler) and
        # a `sampler.set_epoch`
        self.dataset = stream
        self.batch_sampler = None
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        for i in range(self.batches):
            try:
                yield next(it)
            except StopIteration:
                raise RuntimeError(
                    f"the shard stream ended after {i} of {self.batches} batches: every shard failed to "
                    f"read or every sample was skipped; see the skip warnings above"
                ) from None
