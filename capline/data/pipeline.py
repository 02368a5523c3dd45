"""WebDataset streams for training (fixed batches per rank, deterministic, resumable) and evaluation (exactly once).

Every dataloader worker on every rank is one *slot*. Shards are split across slots; with fewer shards than
slots, every slot reads all shards and keeps every n-th sample, so slots never share a sample either way.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from capline.data.decode import SkipCounter

log = logging.getLogger(__name__)

RawSample = dict
BatchFn = Callable[[list[RawSample], SkipCounter, int], dict]


def stable_seed(*parts) -> int:
    """A seed from any values, identical in every process (Python's `hash` of a str is not)."""
    return zlib.crc32("/".join(map(str, parts)).encode("utf-8", "surrogatepass"))  # tar names may not be UTF-8


def sample_id(raw: RawSample) -> str:
    """A sample's name across a shard list: its shard's URL and its key."""
    return f"{raw.get('__url__')}\t{raw['__key__']}"


def worker_slot(rank: int, world_size: int, rotate: int = 0) -> tuple[int, int, int, int]:
    """Returns (slot, num_slots, logical worker, num_workers) of the calling dataloader worker.

    `rotate` renumbers workers so that after resuming at batch b the first worker the loader polls continues
    the stream of the worker that would have produced batch b.
    """
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    logical = (worker + rotate) % num_workers
    return rank * num_workers + logical, world_size * num_workers, logical, num_workers


def assign_shards(urls: list[str], slot: int, num_slots: int) -> tuple[list[str], bool]:
    """The shards a slot reads, and whether it must keep only every `num_slots`-th sample of them."""
    if len(urls) >= num_slots:
        return urls[slot::num_slots], False
    return urls, True


class _Stream(IterableDataset):
    """What both streams share: shard reading with counted skips, per-slot assignment, batching."""

    def __init__(self, urls: list[str], make_batch: BatchFn, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.urls = list(urls)
        self.make_batch = make_batch
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, urls: list[str], counter: SkipCounter) -> Iterator[RawSample]:
        for url in urls:
            yield from self._read_shard(url, counter)

    @staticmethod
    def _read_shard(url: str, counter: SkipCounter) -> Iterator[RawSample]:
        # One shard at a time, counted once: webdataset reports a tar cut inside a member twice (the member, then
        # the header after it), and must not group a broken shard's last sample with the next shard's first.
        broken = False

        def broken_shard(exn: Exception) -> bool:
            nonlocal broken
            if not broken:
                counter.add("broken_shard")
                log.debug("skipping the rest of a broken shard: %s", exn)
            broken = True
            return True

        path = url.removeprefix("file://")
        if not os.path.isfile(path):  # URLs, pipe: commands
            yield from wds.tariterators.tarfile_samples([{"url": url}], handler=broken_shard)
            return
        files = _local_tar_files(path, url, broken_shard)
        yield from wds.tariterators.group_by_keys(files, handler=broken_shard)


def _local_tar_files(path: str, url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """The regular files of a local tar as webdataset's `{"fname", "data", "__url__"}` dicts, then the end-of-shard
    marker `{}`. A seekable file reads each member in one call, twice as fast as webdataset's streaming reader,
    which any URL still goes through; errors go to `handler` like webdataset's."""
    try:
        with tarfile.open(path, mode="r") as tar:  # plain or compressed, like webdataset's "r|*"
            for member in tar:
                tar.members = []  # no growing list of every member of a large shard
                if member.isreg() and not member.name.startswith("__"):
                    yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
    except (tarfile.TarError, OSError, EOFError) as exn:
        handler(exn)
    yield {}


class TrainStream(_Stream):
    """An endless, deterministic stream cut into epochs of exactly `batches_per_epoch` batches per rank.

    The order is a function of (seed, epoch, rank, worker) only. `start_batch` resumes inside an epoch: the
    batches already consumed are re-read from the tar files but never decoded.
    """

    def __init__(self, *args, batches_per_epoch: int, seed: int = 0, shuffle_buffer: int = 1000, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _slot_samples(self, slot: int, num_slots: int, counter: SkipCounter) -> Iterator[RawSample]:
        # One shard order per epoch, shared by every slot so the split into slots is a partition.
        order = random.Random(stable_seed(self.seed, self.epoch)).sample(self.urls, len(self.urls))
        mine, stride = assign_shards(order, slot, num_slots)
        for repeat in itertools.count():  # a slot that runs out of shards before the epoch ends starts over
            shards = random.Random(stable_seed(self.seed, self.epoch, slot, repeat)).sample(mine, len(mine))
            samples = self._read(shards, counter)
            if stride:
                samples = itertools.islice(samples, slot, None, num_slots)
            # Shuffled within one pass over the slot's shards, so a small slot never holds a sample twice.
            rng = random.Random(stable_seed(self.seed, self.epoch, slot, repeat, "shuffle"))
            yielded = 0
            for sample in wds.filters._shuffle(samples, self.shuffle_buffer, rng=rng):
                yielded += 1
                yield sample
            if not yielded:  # starting over would loop forever
                raise RuntimeError(f"no readable sample in the training shards {shards[:3]} (all empty or broken)")

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, worker, num_workers = worker_slot(self.rank, self.world_size, rotate=self.start_batch)
        quota = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        done = self.start_batch // num_workers + (worker < self.start_batch % num_workers)
        counter = SkipCounter()
        samples = self._slot_samples(slot, num_slots, counter)
        for index in range(quota):
            chunk = list(itertools.islice(samples, self.batch_size))
            if index >= done:
                yield self.make_batch(chunk, counter, self.epoch)


class EvalStream(_Stream):
    """Every sample of the shards exactly once across all ranks and workers, in shard order.

    With `merged` (`capline.data.groups.merge_image_samples`), only each image's owner sample is kept, carrying
    all the image's captions in `__refs__`: every image once, however many samples it has.
    """

    def __init__(self, *args, merged: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.merged = merged

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, _, _ = worker_slot(self.rank, self.world_size)
        mine, stride = assign_shards(self.urls, slot, num_slots)
        counter = SkipCounter()
        samples = self._read(mine, counter)
        if stride:
            samples = itertools.islice(samples, slot, None, num_slots)
        if self.merged is not None:
            samples = self._owners(samples)
        while chunk := list(itertools.islice(samples, self.batch_size)):
            yield self.make_batch(chunk, counter, 0)

    def _owners(self, samples: Iterator[RawSample]) -> Iterator[RawSample]:
        for raw in samples:
            refs = self.merged.get(sample_id(raw))
            if refs is not None:
                yield raw | {"__refs__": refs}


def pad_sequences(seqs: list[list[int]], pad: int = 0) -> torch.Tensor:
    """Right-pads integer lists into a (N, max_len) tensor."""
    out = torch.full((len(seqs), max((len(s) for s in seqs), default=1)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
