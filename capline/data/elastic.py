"""The elastic training order: a function of the seed, the epoch and the global batch size, not of how many
processes or dataloader workers read it.

An epoch's samples, in a shard order drawn from (seed, epoch), are cut into as many *lanes* of consecutive
samples as a global batch has images: lane l gives image l of every global batch, its samples shuffled in blocks
of `block`. Rank r of M takes images [r B/M, (r+1) B/M) of every global batch, and its dataloader workers split
these again: each worker makes its part of every batch from its own lanes, which no other worker reads.

Nothing in the order names a process or a worker, so a checkpoint taken on N x W resumes on M x V; and where a
lane is after b batches is known without reading anything: resuming reads one block per lane, from the shard
that holds it (earlier shards are skipped using the sample counts).
"""

from __future__ import annotations

import bisect
import itertools
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def stable_seed(*parts) -> int:
    """A seed from any values, identical in every process (Python's `hash` of a str is not)."""
    return zlib.crc32("/".join(map(str, parts)).encode("utf-8", "surrogatepass"))  # tar names may not be UTF-8


@dataclass(frozen=True)
class ElasticOrder:
    """The epoch order of the samples of `counts`, a tuple of samples per shard in the shard list's order.

    A *position* is a sample's index in the concatenation of the shards in the epoch's shard order;
    `locator(epoch)` turns it into (shard, index in the shard).
    """

    counts: tuple[int, ...]
    batch_size: int  # images per global batch, which is the number of lanes
    batches_per_epoch: int
    seed: int = 0
    block: int = 1  # consecutive samples a lane shuffles together

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def span(self) -> int:
        """Samples the lanes are cut from: every sample once, or repeated when there are fewer than lanes."""
        return self.total * -(-self.batch_size // self.total) if self.total else 0

    def shard_order(self, epoch: int) -> list[int]:
        return random.Random(stable_seed(self.seed, epoch)).sample(range(len(self.counts)), len(self.counts))

    def locator(self, epoch: int) -> Callable[[int], tuple[int, int]]:
        """A function from an epoch position to (shard, index of the sample in that shard)."""
        order = self.shard_order(epoch)
        starts = list(itertools.accumulate((self.counts[s] for s in order), initial=0))

        def locate(position: int) -> tuple[int, int]:
            i = bisect.bisect_right(starts, position) - 1  # empty shards share a start: the last is the right one
            return order[i], position - starts[i]

        return locate

    def lane_range(self, lane: int) -> tuple[int, int]:
        return lane * self.span // self.batch_size, (lane + 1) * self.span // self.batch_size

    def lane_blocks(self, epoch: int, lane: int, start_batch: int = 0) -> Iterator[list[int]]:
        """The positions lane `lane` gives to batches `start_batch`, ..., `batches_per_epoch - 1`, one block of
        the lane at a time (the first block cut where `start_batch` falls). An epoch longer than the lane starts
        it over in a new shuffle."""
        first, stop = self.lane_range(lane)
        length, batch = stop - first, start_batch
        while length and batch < self.batches_per_epoch:
            repeat, at = divmod(batch, length)
            begin = at // self.block * self.block
            size = min(self.block, length - begin)
            shuffled = random.Random(stable_seed(self.seed, epoch, lane, repeat, begin)).sample(range(size), size)
            positions = [(first + begin + i) % self.total for i in shuffled[at - begin :]]
            positions = positions[: self.batches_per_epoch - batch]
            batch += len(positions)
            yield positions

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of the epoch as its positions, lane by lane (for tests and measurements)."""
        lanes = [list(itertools.chain(*self.lane_blocks(epoch, lane))) for lane in range(self.batch_size)]
        return [[lane[b] for lane in lanes if b < len(lane)] for b in range(self.batches_per_epoch)]


def slot_lanes(batch_size: int, rank: int, world_size: int, worker: int, num_workers: int) -> range:
    """The lanes (images of every global batch) that `worker` of `num_workers` on `rank` makes."""
    per_rank = batch_size // world_size
    first = rank * per_rank
    return range(first + worker * per_rank // num_workers, first + (worker + 1) * per_rank // num_workers)


def even_counts(samples: int, num_shards: int) -> tuple[int, ...]:
    """Samples per shard assumed when only the total is known (remote shards without an index)."""
    return tuple(samples // num_shards + (i < samples % num_shards) for i in range(num_shards))
