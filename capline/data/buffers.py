"""Moving batches from dataloader workers to the main process without copying their images.

Images are written once, by the worker that decodes them, into shared memory that the main process maps:
- training batches go into a ring of batch buffers that the main process allocates before the workers start:
  a worker writes its rows (all of them, or its part when several workers make each batch) and sends only where
  they are, so the main process joins the parts as a view over the buffer: no copy, no file descriptor passed,
  and the pages stay mapped from one use of the buffer to the next;
- evaluation batches, which each worker makes whole, go into that worker's own recycled buffers.
Everything else in a batch (token ids, references, counts: a few KB) travels by value, which costs less than
passing a file descriptor for each small tensor.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, get_worker_info

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
_BY_VALUE_BYTES = 1 << 20  # tensors up to this size that are not in shared memory are pickled by value


class BatchPlace(NamedTuple):
    """Where a worker's images go in the rank's training batch."""

    index: int  # the batch's number in the epoch
    first_row: int  # the worker's first image in the batch


class RingRows(NamedTuple):
    """What a worker sends instead of the images it wrote into a ring buffer."""

    slot: int
    worker: int
    first_row: int
    rows: int


class ImageBuffers:
    """Uninitialised uint8 (N, H, W, 3) image buffers in shared memory, recycled once nothing uses them.

    Each image is written into its buffer once, pixel-interleaved as PIL decodes it: the (B, 3, H, W) view over
    it is channels-last, which timm's convolutions take as it is (no transpose in the worker, none on the device).

    Fresh shared memory is slow to write the first time (a page fault per 4 KiB page, a few percent of the decode
    time), so buffers are reused, but only once the main process holds no tensor on them: a ring buffer when its
    storage's use count is back to the ring's own references, a worker's buffer when the weak reference to its
    batch's storage has expired. A flag per buffer and worker in shared memory (1 = in use) is set by the worker
    and cleared by the main process; with every buffer held (user code keeping batches), a worker takes fresh
    memory: nothing is overwritten while anything can still see it.

    Args:
        image_size: Pixels per side of the images.
        slots_per_worker: Whole-batch buffers each worker keeps (allocated by the worker when first needed).
    """

    def __init__(self, image_size: int, slots_per_worker: int = 8):
        self.image_size, self.slots_per_worker = image_size, slots_per_worker
        self.num_workers = 0
        self.flags: torch.Tensor | None = None  # worker slots, then ring slots x workers; set by `start`
        self.ring: list[torch.Tensor] = []  # (B, H, W, 3) each, for training batches
        self._slots: dict[int, torch.Tensor] = {}  # a worker's own flat buffers, by slot
        self._main: _MainSide | None = None

    def __getstate__(self) -> dict:  # a worker starts with its own (empty) set of buffers
        return self.__dict__ | {"_slots": {}, "_main": None}

    # In the main process.

    def start(self, num_workers: int, ring_batch_size: int = 0, ring_slots: int = 8) -> None:
        """Called by the loader before its workers start; `ring_batch_size`: images per training batch (0: no
        ring). A new ring each time: the last one's batches may still be held, and new workers would write
        over them."""
        self.num_workers = num_workers
        shape = (ring_batch_size, self.image_size, self.image_size, 3)
        self.ring = [_shared_buffer(int(np.prod(shape))).view(shape) for _ in range(ring_slots)] if ring_batch_size \
            else []  # fmt: skip
        self.flags = torch.zeros(num_workers * (self.slots_per_worker + len(self.ring)), dtype=torch.uint8)
        self.flags.share_memory_()
        self._main = _MainSide(self.ring)

    def receive(self, batch: dict) -> dict:
        """A batch from a worker with its images as a tensor (a view into the ring where they were written)."""
        rows = batch.get("images")
        if isinstance(rows, RingRows):
            self._main.received[rows.slot].add(rows.worker)
            batch["images"] = self.ring[rows.slot][rows.first_row : rows.first_row + rows.rows].permute(0, 3, 1, 2)
        return batch

    def release(self, batch: dict) -> None:
        """Frees the buffers nothing refers to any more, then starts tracking those of `batch`."""
        main = self._main
        for slot, workers in enumerate(main.received):
            if workers and torch._C._storage_Use_Count(main.storages[slot]._cdata) == main.unused[slot]:
                self.flags[[self._ring_flag(slot, w) for w in workers]] = 0
                workers.clear()
        for ref, slots in main.held:
            if ref.expired():
                self.flags[slots] = 0
        main.held = [(ref, slots) for ref, slots in main.held if not ref.expired()]
        if batch.get("buffer_slots"):
            main.held.append((StorageWeakRef(batch["images"].untyped_storage()), batch["buffer_slots"]))

    # In a worker.

    def get(self, num_images: int, place: BatchPlace | None = None) -> tuple[torch.Tensor, int | RingRows]:
        """A buffer for `num_images` images and what tells the main process where it is: a `RingRows`, the
        index of its flag, or -1 (memory of its own)."""
        size = self.image_size
        shape, numel = (num_images, size, size, 3), num_images * size * size * 3
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=torch.uint8), -1
        if self.flags is None or info.num_workers != self.num_workers:  # not started by a RecyclingDataLoader
            return _shared_buffer(numel).view(shape), -1
        if place is not None and self.ring:
            return self._ring_rows(place, num_images, info.id)
        first = info.id * self.slots_per_worker
        free = (self.flags[first : first + self.slots_per_worker] == 0).nonzero()
        if not free.numel():
            return _shared_buffer(numel).view(shape), -1
        slot = first + int(free[0])
        buffer = self._slots.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = self._slots[slot] = _shared_buffer(numel)
        self.flags[slot] = 1
        return buffer[:numel].view(shape), slot

    def _ring_rows(self, place: BatchPlace, num_images: int, worker: int) -> tuple[torch.Tensor, int | RingRows]:
        slot = place.index % len(self.ring)
        flag = self._ring_flag(slot, worker)
        buffer = self.ring[slot]
        if place.first_row + num_images <= buffer.shape[0] and self.flags[flag] == 0:
            self.flags[flag] = 1  # only this worker sets it, only the main process clears it
            return buffer[place.first_row : place.first_row + num_images], RingRows(slot, worker, place.first_row, 0)
        return _shared_buffer(num_images * buffer[0].numel()).view(num_images, *buffer.shape[1:]), -1

    def _ring_flag(self, slot: int, worker: int) -> int:
        return self.num_workers * self.slots_per_worker + slot * self.num_workers + worker

    @staticmethod
    def batch_entries(images: torch.Tensor, where: int | RingRows) -> dict:
        """The batch's `images` (B, 3, H, W) for a buffer from `get` holding `images.shape[0]` images, and the
        buffer bookkeeping that `RecyclingDataLoader` takes out again."""
        if isinstance(where, RingRows):
            return {"images": where._replace(rows=images.shape[0])}
        view = {"images": images.permute(0, 3, 1, 2)}  # viewed on channels-last memory
        return view | {"buffer_slots": [where]} if where >= 0 else view


class _MainSide:
    """The main process's bookkeeping of the buffers in use."""

    def __init__(self, ring: list[torch.Tensor]):
        self.storages = [buffer.untyped_storage() for buffer in ring]
        self.unused = [torch._C._storage_Use_Count(s._cdata) for s in self.storages]  # the ring's own references
        self.received: list[set[int]] = [set() for _ in ring]  # per ring slot: the workers whose rows arrived
        self.held: list[tuple[StorageWeakRef, list[int]]] = []  # worker buffers: (their batch's storage, flags)


def _shared_buffer(numel: int) -> torch.Tensor:
    """`numel` uninitialised bytes of shared memory, allocated the way `default_collate` does in workers."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))


class RecyclingDataLoader(DataLoader):
    """A `DataLoader` over a stream whose batcher has `ImageBuffers`: it receives the images where the workers
    wrote them, joins the parts of training batches, and frees buffers nothing refers to any more (checked as
    each batch arrives).

    With `stream_state` (the data module, for the training stream), it is resumable the way Lightning checks for:
    `state_dict`/`load_state_dict` hand the stream's position to and from the checkpoint.
    """

    ring_slots_beyond_prefetch = 4  # the batch Lightning prefetches, the one in the step, and spares

    def __init__(self, *args, stream_state=None, **kwargs):
        init_worker = functools.partial(die_with_parent, parent=os.getpid())  # the PID the workers are forked from
        super().__init__(*args, collate_fn=to_transport, worker_init_fn=init_worker, **kwargs)
        self.stream_state = stream_state

    def state_dict(self) -> dict:
        return self.stream_state.state_dict() if self.stream_state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.stream_state is not None:
            self.stream_state.load_state_dict(state_dict)

    def __iter__(self):
        buffers = getattr(getattr(self.dataset, "make_batch", None), "buffers", None)
        recycling = bool(self.num_workers) and isinstance(buffers, ImageBuffers)
        if recycling:  # before the workers start
            ring_batch_size = getattr(self.dataset, "ring_batch_size", 0)
            # Ring slots: the batches the workers may have made ahead (each worker makes part of every batch),
            # plus those the main process holds.
            in_flight = self.prefetch_factor if ring_batch_size else self.prefetch_factor * self.num_workers
            buffers.start(self.num_workers, ring_batch_size, in_flight + self.ring_slots_beyond_prefetch)
        batches = map(from_transport, super().__iter__())
        if recycling:
            batches = map(buffers.receive, batches)
        for batch in join_worker_parts(batches):
            if recycling:
                buffers.release(batch)
            batch.pop("buffer_slots", None)
            yield batch


def die_with_parent(worker_id: int, parent: int) -> None:
    """Makes a loader worker end with the process that started it, even one killed by SIGKILL (the OOM killer,
    a test, a scheduler). A worker waiting for a free ring slot never gets back to PyTorch's own check that its
    parent lives, so without this it would wait for ever, holding its shared memory (and it ignores SIGTERM, as
    the training process it was forked from does until a step boundary)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect (read after fork, 1 would pass)
        os._exit(1)


def to_transport(batch: dict) -> dict:
    """The loader's collate function (run in the worker): small tensors outside shared memory become numpy
    arrays, pickled by value, instead of each being moved to shared memory and passed as a file descriptor."""
    if not isinstance(batch, dict):
        return batch
    return {name: value.numpy() if _by_value(value) else value for name, value in batch.items()}


def _by_value(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_shared() and value.nbytes <= _BY_VALUE_BYTES


def from_transport(batch: dict) -> dict:
    """A batch as the worker made it: the numpy arrays of `to_transport` as tensors again (no copy)."""
    if not isinstance(batch, dict):
        return batch
    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in batch.items()}


def join_worker_parts(batches: Iterator[dict]) -> Iterator[dict]:
    """Joins the parts of each training batch that the workers of a rank make (`TrainStream` marks them
    `part`: (worker, num_workers); they arrive one after the other, in worker order); other batches pass."""
    parts: list[dict] = []
    for batch in batches:
        if "part" not in batch:
            yield batch
            continue
        parts.append(batch)
        if len(parts) == batch["part"][1]:
            assert [p["part"][0] for p in parts] == list(range(len(parts))), "parts out of worker order"
            joined = join_parts(parts)
            parts = []
            yield joined


def join_parts(parts: list[dict]) -> dict:
    """One batch from its parts: images (a view when they lie side by side in one buffer), ids, tokens and
    references concatenated, skip counts summed."""
    batch = {}
    for name, first in parts[0].items():
        if name == "part":
            continue
        values = [p[name] for p in parts]
        if name == "images":
            batch[name] = join_images(values)
        elif name == "skipped":
            batch[name] = sum(values)
        elif isinstance(first, torch.Tensor):
            width = max(v.shape[1] for v in values) if first.dim() == 2 else None  # tokens: padded to the longest
            batch[name] = torch.cat([v if width is None else F.pad(v, (0, width - v.shape[1])) for v in values])
        elif isinstance(first, list):
            batch[name] = [item for v in values for item in v]
        else:
            batch[name] = first
    return batch


def join_images(parts: list[torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W) channels-last views joined: a view over their buffer when each part starts where the one
    before it ends in the same storage (rows of one ring buffer), else a copy."""
    first, storage = parts[0], parts[0].untyped_storage()
    adjacent = all(
        p.untyped_storage().data_ptr() == storage.data_ptr() and p.stride() == first.stride()
        and p.storage_offset() == q.storage_offset() + q.numel()
        for q, p in zip(parts, parts[1:])
    )  # fmt: skip
    if adjacent and first.is_contiguous(memory_format=torch.channels_last):
        rows = sum(p.shape[0] for p in parts)
        return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]), first.stride())
    return torch.cat([p.permute(0, 2, 3, 1) for p in parts]).permute(0, 3, 1, 2)
