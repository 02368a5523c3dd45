"""Worker batch buffers are recycled once the main process has dropped every tensor on them, and never before."""

from __future__ import annotations

import os

import pytest
import torch

from capline.data.datamodule import CaptionDataModule

SLOTS = 8  # ImageBuffers' default slots per worker


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


def test_dropped_batches_reuse_a_few_buffers(synthetic_data):
    files = [shm_file(batch["images"]) for batch in loader(synthetic_data)]
    assert len(files) == 24
    assert len(set(files)) <= SLOTS  # 24 batches, at most 8 buffers: the rest were recycled


@pytest.mark.parametrize("keep", ["batch", "one image view"])
def test_a_buffer_still_referenced_is_never_written_again(synthetic_data, keep):
    kept, copies, files = [], [], []
    for batch in loader(synthetic_data):
        assert "buffer_slot" not in batch  # the loader's own bookkeeping does not leak into batches
        images = batch["images"]
        kept.append(images if keep == "batch" else images[3])  # a view keeps the whole buffer alive
        copies.append(kept[-1].clone())
        files.append(shm_file(images))
        del batch, images
    assert all(torch.equal(k, c) for k, c in zip(kept, copies))  # nothing held was overwritten
    assert len(set(files)) == 24  # every held buffer stayed with its batch; the worker took fresh memory
