"""WebDataset streams for training (the elastic order of `capline.data.elastic`, resumable on any number of
processes and workers) and evaluation (exactly once).

For evaluation, every dataloader worker on every rank is one *slot*. Shards are split across slots; with fewer
shards than slots, every slot reads all shards and keeps every n-th sample, so slots never share a sample.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import tarfile
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from capline.data.buffers import BatchPlace
from capline.data.counting import NotATar, local_path, tar_members, tar_sample_offsets
from capline.data.decode import SkipCounter
from capline.data.elastic import ElasticOrder, slot_lanes
from capline.data.http import HTTPOptions, HTTPShardStream, ShardReadError, is_http
from capline.errors import causes

log = logging.getLogger(__name__)

RawSample = dict
BatchFn = Callable[..., dict]  # (samples, counter, epoch, place: BatchPlace | None) -> batch


def sample_id(raw: RawSample) -> str:
    """A sample's name across a shard list: its shard's URL and its key."""
    return f"{raw.get('__url__')}\t{raw['__key__']}"


def worker_slot(rank: int, world_size: int) -> tuple[int, int, int, int]:
    """Returns (slot, num_slots, worker, num_workers) of the calling dataloader worker."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * num_workers + worker, world_size * num_workers, worker, num_workers


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
        self.http: HTTPOptions | None = None  # how http(s):// shards are read (`data.http`; None: the default)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, urls: list[str], counter: SkipCounter) -> Iterator[RawSample]:
        for url in urls:
            yield from self._read_shard(url, counter, self.http)

    @staticmethod
    def _read_shard(url: str, counter: SkipCounter, http: HTTPOptions | None = None) -> Iterator[RawSample]:
        # One shard at a time, counted once: webdataset reports a tar cut inside a member twice (the member, then
        # the header after it), and must not group a broken shard's last sample with the next shard's first.
        broken = False

        def broken_shard(exn: Exception) -> bool:
            nonlocal broken
            if not broken:
                counter.add("broken_shard")
                remote = _shard_read_error(exn)
                if remote is not None:  # a remote shard after every retry: say which one
                    log.warning("%s; the rest of the shard is skipped (data/skipped/broken_shard)", remote)
                else:
                    log.debug("skipping the rest of a broken shard: %s", exn)
            broken = True
            return True

        if is_http(url):  # resumed where a connection broke, retried with back-off, never stalled for good
            try:
                stream = io.BufferedReader(HTTPShardStream(url, http), 1 << 16)
            except ShardReadError as err:
                broken_shard(err)
                return
            with stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=broken_shard)
                yield from wds.tariterators.group_by_keys(files, handler=broken_shard)
            return
        path = url.removeprefix("file://")
        if not os.path.isfile(path):  # URLs, pipe: commands
            yield from wds.tariterators.tarfile_samples([{"url": url}], handler=broken_shard)
            return
        files = _local_tar_files(path, url, broken_shard)
        yield from wds.tariterators.group_by_keys(files, handler=broken_shard)


def _shard_read_error(exn: BaseException | None) -> ShardReadError | None:
    """The `ShardReadError` behind `exn` (tarfile reports a failed read of its stream as its own error)."""
    return next((e for e in causes(exn) if isinstance(e, ShardReadError)), None)


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
    """An endless, deterministic stream cut into epochs of exactly `order.batches_per_epoch` batches per rank.

    The order is `order`'s (seed, epoch, global batch size), whatever the number of ranks and workers. With
    several workers, each yields its part of every batch, marked `part` (worker, num_workers), and the loader
    joins the parts (`capline.data.buffers.join_worker_parts`). `start_batch` resumes inside an epoch: each lane reads
    from the block it is in; nothing consumed before it is read again.
    """

    def __init__(self, urls: list[str], make_batch: BatchFn, order: ElasticOrder, rank: int = 0, world_size: int = 1):
        super().__init__(urls, make_batch, order.batch_size // world_size, rank, world_size)
        self.order = order
        self.start_batch = 0

    def __len__(self) -> int:
        return self.order.batches_per_epoch

    @property
    def ring_batch_size(self) -> int:
        """Images per buffer of the loader's ring (`capline.data.buffers`): the rank's batch, which each worker
        writes its part of in place."""
        return self.batch_size

    def __iter__(self) -> Iterator[dict]:
        _, _, worker, num_workers = worker_slot(self.rank, self.world_size)
        counter = SkipCounter()
        reader = SampleReader(self.urls, self.order.locator(self.epoch), counter, self.http)
        my_lanes = slot_lanes(self.batch_size * self.world_size, self.rank, self.world_size, worker, num_workers)
        lanes = [self._lane(reader, lane) for lane in my_lanes]
        for index in range(self.start_batch, self.order.batches_per_epoch):
            part = [raw for raw in (next(lane, None) for lane in lanes) if raw is not None]
            place = BatchPlace(index, first_row=my_lanes.start - self.rank * self.batch_size)
            batch = self.make_batch(part, counter, self.epoch, place)
            yield batch | {"part": (worker, num_workers)} if num_workers > 1 else batch

    def _lane(self, reader: SampleReader, lane: int) -> Iterator[RawSample | None]:
        for positions in self.order.lane_blocks(self.epoch, lane, self.start_batch):
            samples = reader.read(lane, positions)
            yield from (samples.get(p) for p in positions)  # None: a sample the shard did not hold


class SampleReader:
    """Reads samples by epoch position: local plain tars at the byte offsets of their samples (found from the
    headers once per shard), any other shard as a stream from its start, kept open per lane while the lane reads
    on in the same shard."""

    def __init__(self, urls: list[str], locate: Callable[[int], tuple[int, int]], counter: SkipCounter,
                 http: HTTPOptions | None = None):  # fmt: skip
        self.urls, self.locate, self.counter, self.http = urls, locate, counter, http
        self._offsets: dict[int, list[int] | None] = {}
        self._streams: dict[int, tuple[int, int, Iterator[RawSample]]] = {}  # lane: (shard, next index, stream)
        self._broken: set[int] = set()

    def read(self, lane: int, positions: list[int]) -> dict[int, RawSample]:
        """{position: sample} for the samples at `positions` (read in shard order; missing ones left out)."""
        found = {}
        located = sorted((self.locate(p), p) for p in positions)
        for shard, run in itertools.groupby(located, key=lambda item: item[0][0]):
            run = list(run)
            samples = self._read_shard_run(lane, shard, [index for (_, index), _ in run])
            found.update((p, s) for (_, p), s in zip(run, samples) if s is not None)
        return found

    def _read_shard_run(self, lane: int, shard: int, indices: list[int]) -> list[RawSample | None]:
        if shard not in self._offsets:
            path = local_path(self.urls[shard])
            try:
                self._offsets[shard] = tar_sample_offsets(path) if path is not None and _plain_file(path) else None
            except OSError:  # read as a stream, which counts it as broken
                self._offsets[shard] = None
        offsets = self._offsets[shard]
        if offsets is None:
            return self._stream_run(lane, shard, indices)
        url, out = self.urls[shard], []
        with open(local_path(url), "rb", buffering=0) as file:
            for i in indices:
                sample = None
                if i + 1 < len(offsets):
                    start, stop = offsets[i], offsets[i + 1]
                    sample = _parse_sample(os.pread(file.fileno(), stop - start, start), stop - start, url)
                if sample is None:
                    self._mark_broken(shard)
                out.append(sample)
        return out

    def _stream_run(self, lane: int, shard: int, indices: list[int]) -> list[RawSample | None]:
        current, next_index, stream = self._streams.get(lane, (-1, 0, iter(())))
        if current != shard or next_index > indices[0]:
            next_index, stream = 0, _Stream._read_shard(self.urls[shard], self.counter, self.http)
        out = []
        for i in indices:
            sample = next(itertools.islice(stream, i - next_index, None), None)
            next_index = i + 1
            out.append(sample)
        self._streams[lane] = (shard, next_index, stream)
        return out

    def _mark_broken(self, shard: int) -> None:
        if shard not in self._broken:
            self._broken.add(shard)
            self.counter.add("broken_shard")
            log.debug("shard %s holds fewer readable samples than it was counted with", self.urls[shard])


def _plain_file(path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(2) not in (b"\x1f\x8b", b"BZ", b"\xfd7")  # gzip, bzip2, xz: read as a stream
    except OSError:
        return False


def _parse_sample(data: bytes, size: int, url: str) -> RawSample | None:
    """The sample in `data`, the bytes of its run of tar members; None when they are cut short."""
    sample, end = {}, 0
    try:
        for member in tar_members(lambda offset, length: data[offset : offset + length]):
            if member.data + member.size > len(data):  # cut short
                return None
            base, _, extension = member.name.rpartition("/")[2].partition(".")
            if member.regular and extension and not base.startswith("__"):
                folder = member.name.rpartition("/")[0]
                sample.setdefault("__key__", f"{folder}/{base}" if folder else base)
                sample[extension.lower()] = data[member.data : member.data + member.size]
            end = member.end
    except NotATar:
        return None
    if end != size or "__key__" not in sample:
        return None
    return sample | {"__url__": url}


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
