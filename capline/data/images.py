"""Image files for `capline predict`: a folder or a glob of JPEG, PNG and WebP files, each read once across ranks."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from capline.data.collate import ImageTransform
from capline.data.decode import SkipSample, image_id_for, open_image
from capline.data.pipeline import worker_slot

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class NoImagesError(ValueError):
    """A prediction folder or glob without a single image file."""


def find_image_files(pattern: str) -> list[str]:
    """A folder's `*.jpg`, `*.jpeg`, `*.png`, `*.webp` files (not its subfolders), or the image files a glob
    matches (`**` descends), sorted; raises `NoImagesError` when there is none."""
    folder = Path(pattern)
    candidates = folder.iterdir() if folder.is_dir() else map(Path, glob.glob(pattern, recursive=True))
    files = sorted(str(p) for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        kind = "folder" if folder.is_dir() else "pattern"
        raise NoImagesError(f"data.predict_images: the {kind} {pattern!r} holds no JPEG, PNG or WebP file")
    return files


class ImageFileStream(IterableDataset):
    """Batches of image files, every file exactly once across ranks and dataloader workers.

    A batch is a dict: `images` uint8 (B, 3, H, W) preprocessed as in training, `image_ids` (B,), `files` (B paths)
    and `unreadable`: `(path, reason)` for each file of the batch that could not be decoded (not in `images`).
    """

    def __init__(self, files: list[str], transform: ImageTransform, batch_size: int, rank: int = 0, world_size=1):
        super().__init__()
        self.files, self.transform, self.batch_size = list(files), transform, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, _, _ = worker_slot(self.rank, self.world_size)
        mine = self.files[slot::num_slots]
        for start in range(0, len(mine), self.batch_size):
            yield self._batch(mine[start : start + self.batch_size])

    def _batch(self, files: list[str]) -> dict:
        size = self.transform.size
        images = np.empty((len(files), size, size, 3), np.uint8)
        readable, unreadable = [], []
        for path in files:
            try:
                image = open_image(Path(path).read_bytes(), draft_size=self.transform.resize_to)
                self.transform.write(image, images[len(readable)])
            except SkipSample as skip:
                unreadable.append((path, str(skip)))
            except OSError as err:  # vanished, unreadable permissions, a folder named like an image
                unreadable.append((path, f"unreadable: {err.strerror or err}"))
            else:
                readable.append(path)
        return {
            "images": torch.from_numpy(images[: len(readable)]).permute(0, 3, 1, 2),  # (B, 3, H, W), channels-last
            "image_ids": torch.tensor([image_id_for(p) for p in readable], dtype=torch.long),
            "files": readable,
            "unreadable": unreadable,
        }
