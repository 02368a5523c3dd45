"""Batch buffers: images arrive where the workers wrote them (parts of a batch joined without a copy), buffers
are recycled once the main process has dropped every tensor on them, and never before."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from capline.data.buffers import from_transport, join_images, to_transport
from capline.data.datamodule import CaptionDataModule

RING = 8  # the loader's ring: prefetch_factor 4 batches in flight + 4


def loader(synthetic_data, workers: int = 1):
    data = CaptionDataModule(
        train_shards=synthetic_data["train_shards"], vocab=synthetic_data["vocab"], global_batch_size=16,
        num_workers=workers, samples_per_epoch=16 * 24,
    )  # fmt: skip
    data.image_config = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear"}
    data.setup("fit")
    return data.train_dataloader()


def shm_file(images: torch.Tensor) -> int:
    """The shared-memory file behind a batch received from a worker (the same file = the same buffer)."""
    fd, _ = images.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


@pytest.mark.parametrize("workers", [1, 2])
def test_dropped_batches_reuse_a_few_buffers(synthetic_data, workers):
    files = [shm_file(batch["images"]) for batch in loader(synthetic_data, workers)]
    assert len(files) == 24
    assert len(set(files)) <= RING  # 24 batches, at most 8 buffers: the rest were recycled


def test_parts_of_a_batch_are_joined_in_place(synthetic_data):
    for batch in loader(synthetic_data, workers=2):
        images = batch["images"]
        assert images.shape == (16, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
        # the shared buffer both workers wrote into holds the whole batch: their halves were not copied together
        assert images.is_shared() and images.storage_offset() == 0
        assert images.untyped_storage().nbytes() == images.numel()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("keep", ["batch", "one image view"])
def test_a_buffer_still_referenced_is_never_written_again(synthetic_data, keep, workers):
    kept, copies, files = [], [], []
    for batch in loader(synthetic_data, workers):
        assert "buffer_slots" not in batch  # the loader's own bookkeeping does not leak into batches
        images = batch["images"]
        kept.append(images if keep == "batch" else images[3])  # a view keeps the whole buffer alive
        copies.append(kept[-1].clone())
        files.append(shm_file(images))
        del batch, images
    assert all(torch.equal(k, c) for k, c in zip(kept, copies))  # nothing held was overwritten
    assert len(set(files)) == 24  # every held buffer stayed with its batch; the workers took fresh memory


def test_batches_are_pixel_identical_whatever_the_workers(synthetic_data):
    def epoch(workers):
        return [(batch["keys"], batch["images"].clone(), batch["tokens"]) for batch in loader(synthetic_data, workers)]

    reference = epoch(0)
    for workers in (1, 2):
        for (keys, images, tokens), (keys0, images0, tokens0) in zip(epoch(workers), reference, strict=True):
            assert keys == keys0 and torch.equal(images, images0) and torch.equal(tokens, tokens0)


def test_small_tensors_travel_by_value_and_come_back_equal():
    shared = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).share_memory_()
    batch = {"images": shared, "tokens": torch.tensor([[1, 5, 2]]), "keys": ["a"], "skipped": torch.zeros(3)}
    sent = to_transport(batch)
    assert isinstance(sent["tokens"], np.ndarray) and isinstance(sent["skipped"], np.ndarray)
    assert sent["images"] is shared  # already in shared memory: passed as it is
    back = from_transport(sent)
    assert torch.equal(back["tokens"], batch["tokens"]) and back["tokens"].dtype == torch.long
    assert back["skipped"].dtype == torch.float32 and back["keys"] == ["a"]


def test_parts_that_do_not_lie_side_by_side_are_copied():
    buffer = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).view(4, 2, 2, 3)
    first, gap_second = buffer[0:1].permute(0, 3, 1, 2), buffer[2:4].permute(0, 3, 1, 2)
    joined = join_images([first, gap_second])
    assert joined.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    assert torch.equal(joined.permute(0, 2, 3, 1), buffer[[0, 2, 3]])
    adjacent = join_images([buffer[0:1].permute(0, 3, 1, 2), buffer[1:4].permute(0, 3, 1, 2)])
    assert adjacent.data_ptr() == buffer.data_ptr() and torch.equal(adjacent.permute(0, 2, 3, 1), buffer)
