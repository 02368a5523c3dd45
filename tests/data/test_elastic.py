"""The elastic order: one order whatever the ranks and workers, exactly once across a topology change, and a
resume that reads only the shards it must."""

from __future__ import annotations

import gzip
import io
import itertools
import sys
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from capline.data.buffers import join_worker_parts
from capline.data.counting import shard_counts
from capline.data.datamodule import CaptionDataModule
from capline.data.elastic import ElasticOrder
from capline.data.pipeline import TrainStream

SIZES = [37, 5, 60, 0, 26, 16]  # 144 samples, uneven shards (one empty); the fifth is gzipped: read as a stream
BATCH = 12  # global batch: 12 batches per epoch


def keys_only(raw_samples, counter, epoch, place=None):
    return {"keys": [r["__key__"] for r in raw_samples]}


def write_shard(path, keys, payload=64, gzipped=False):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key in keys:
            for ext, data in (("json", b"{}"), ("bin", key.encode().ljust(payload, b"."))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(gzip.compress(data) if gzipped else data)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    root, urls, index = tmp_path_factory.mktemp("uneven"), [], 0
    for shard, size in enumerate(SIZES):
        path = root / (f"s{shard}.tar.gz" if shard == 4 else f"s{shard}.tar")
        write_shard(path, [f"k{index + i:04d}" for i in range(size)], gzipped=shard == 4)
        urls.append(str(path))
        index += size
    return urls


def rank_batches(urls, rank, world_size, workers, start=0, epoch=0, batches=12) -> list[list[str]]:
    order = ElasticOrder(tuple(shard_counts(urls)), BATCH, batches, seed=3, block=4)
    stream = TrainStream(urls, keys_only, order, rank, world_size)
    stream.set_epoch(epoch)
    stream.start_batch = start
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [b["keys"] for b in join_worker_parts(iter(loader))]


def global_batches(urls, world_size, workers, start=0, epoch=0) -> list[list[str]]:
    ranks = [rank_batches(urls, r, world_size, workers, start, epoch) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1  # every rank yields as many batches
    return [list(itertools.chain(*parts)) for parts in zip(*ranks)]


def test_the_order_is_the_same_on_any_number_of_ranks_and_workers(uneven):
    reference = global_batches(uneven, 1, 0, epoch=1)
    assert len(reference) == 12 and all(len(b) == BATCH for b in reference)
    for world_size, workers in [(1, 2), (2, 1), (3, 2), (4, 3)]:
        assert global_batches(uneven, world_size, workers, epoch=1) == reference, (world_size, workers)
    assert global_batches(uneven, 1, 0, epoch=2) != reference  # a new order every epoch


def test_the_order_matches_its_plan(uneven):
    order = ElasticOrder(tuple(shard_counts(uneven)), BATCH, 12, seed=3, block=4)
    locate, starts = order.locator(0), list(itertools.accumulate(SIZES, initial=0))
    planned = [[f"k{starts[shard] + index:04d}" for shard, index in map(locate, b)] for b in order.global_batches(0)]
    assert global_batches(uneven, 1, 0) == planned


@pytest.mark.parametrize(
    "before,after,killed_at",
    [((2, 1), (1, 2), 5), ((1, 2), (2, 1), 7), ((2, 2), (2, 2), 1), ((3, 1), (4, 3), 6), ((1, 4), (6, 2), 11)],
)  # fmt: skip
def test_an_epoch_resumed_on_another_topology_sees_every_sample_exactly_once(uneven, before, after, killed_at):
    seen = global_batches(uneven, *before)[:killed_at] + global_batches(uneven, *after, start=killed_at)
    keys = list(itertools.chain(*seen))
    assert len(seen) == 12
    assert sorted(keys) == [f"k{i:04d}" for i in range(sum(SIZES))]  # every sample once, none twice


def test_an_epoch_longer_than_the_data_starts_each_lane_over_in_a_new_shuffle(uneven):
    order = ElasticOrder(tuple(shard_counts(uneven)), BATCH, 24, seed=3, block=4)
    lanes = [list(itertools.chain(*order.lane_blocks(0, lane))) for lane in range(BATCH)]
    assert all(len(lane) == 24 and sorted(lane[:12]) == sorted(lane[12:]) for lane in lanes)
    assert any(lane[:12] != lane[12:] for lane in lanes)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> list[str]:
    """8 shards x 32 samples of 64 KiB: lanes of 64 samples, each over two shards."""
    root = tmp_path_factory.mktemp("big")
    urls = []
    for shard in range(8):
        write_shard(root / f"b{shard}.tar", [f"b{shard}-{i:03d}" for i in range(32)], payload=64 * 1024)
        urls.append(str(root / f"b{shard}.tar"))
    return urls


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def first_batch_reads(urls, start_batch) -> tuple[int, set[str]]:
    """Bytes this process reads, and the shards it opens, to make the first batch after resuming at a batch."""
    order = ElasticOrder(tuple(shard_counts(urls)), 4, 64, block=4)
    stream = TrainStream(urls, keys_only, order)
    stream.start_batch = start_batch
    opened.clear()
    before = bytes_read()
    next(iter(stream))
    return bytes_read() - before, {p for p in opened if p in urls}


opened: list[str] = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/io")
def test_resuming_reads_only_the_shards_the_lanes_are_in(big):
    shard_bytes = sum(map(len, map(open_bytes, big))) // len(big)
    first_batch_reads(big, 1)  # imports and caches warmed up
    early, early_shards = first_batch_reads(big, 6)  # 10% into the epoch
    late, late_shards = first_batch_reads(big, 58)  # 90%
    order = ElasticOrder(tuple(shard_counts(big)), 4, 64, block=4)
    locate = order.locator(0)
    for at, shards in ((6, early_shards), (58, late_shards)):
        expected = {big[locate(next(order.lane_blocks(0, lane, at))[0])[0]] for lane in range(4)}
        assert shards == expected  # one shard per lane; the wholly consumed ones are not even opened
    consumed = 58 * 4 * 64 * 1024
    print(f"bytes read to the first batch: {early} at 10%, {late} at 90%; consumed {consumed}; shard {shard_bytes}")
    assert late <= 4 * shard_bytes  # at most one shard per lane
    assert late < consumed / 5  # far less than re-reading what was consumed
    assert late <= 1.2 * early + 64 * 1024  # no more at 90% than at 10%


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_batches_are_the_same_whatever_the_workers_of_a_rank(synthetic_data):
    def batches(workers):
        data = CaptionDataModule(
            train_shards=synthetic_data["train_shards"], vocab=synthetic_data["vocab"], global_batch_size=8,
            num_workers=workers, samples_per_epoch=32,
        )  # fmt: skip
        data.image_config = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear"}
        data.setup("fit")
        return list(data.train_dataloader())

    one, three = batches(1), batches(3)
    assert len(one) == len(three) == 4
    for a, b in zip(one, three):
        assert a["keys"] == b["keys"] and torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["images"], b["images"]) and b["images"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["image_ids"], b["image_ids"]) and torch.equal(a["skipped"], b["skipped"])
