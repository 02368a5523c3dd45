"""From raw samples to a model-ready batch: decode, resize/crop to uint8, pick and encode captions, pad."""

from __future__ import annotations

import logging
import mmap
import random
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from capline.data.decode import SkipCounter, SkipSample, decode_sample
from capline.data.pipeline import pad_sequences, stable_seed
from capline.vocab import Vocabulary, tokenize

log = logging.getLogger(__name__)

_PAGE_SIZE = mmap.PAGESIZE

_INTERPOLATION = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


class ImageTransform:
    """timm's evaluation transform (resize the short side to size / crop_pct, centre crop), ending in uint8.

    Normalisation by the data config's mean/std happens on the device, in `TimmEncoder`. No random flips:
    captions say "left of" and "right of".
    """

    def __init__(self, data_config: dict):
        self.size = int(data_config["input_size"][-1])
        self.resize_to = int(np.floor(self.size / data_config.get("crop_pct", 1.0)))
        self.interpolation = _INTERPOLATION[data_config.get("interpolation", "bicubic")]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """The model input for one image: uint8 (3, H, W)."""
        out = np.empty((self.size, self.size, 3), np.uint8)
        self.write(img, out)
        return torch.from_numpy(out).permute(2, 0, 1)

    def write(self, img: Image.Image, out: np.ndarray) -> None:
        """Writes the resized and cropped image into `out`, a uint8 (H, W, 3) array."""
        w, h = img.size
        scale = self.resize_to / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        if (new_w, new_h) == (w, h):
            img = img.crop((left, top, left + self.size, top + self.size))
        else:
            # Only the crop is resized (its box in source pixels): resizing a 1 x 20,000 strip whole would take
            # gigabytes and seconds.
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            img = img.resize((self.size, self.size), self.interpolation, box=box, reducing_gap=3.0)
        out[...] = np.asarray(img)


def reference_ids(caption: str, vocab: Vocabulary, max_len: int) -> list[int]:
    """Encodes a reference for CIDEr-D: words outside the vocabulary get their own stable ids >= len(vocab),
    so the score equals the one computed on the words themselves."""
    return [
        vocab.index[w] if w in vocab.index else len(vocab) + (zlib.crc32(w.encode()) & 0x3FFFFFFF)
        for w in tokenize(caption)[:max_len]
    ]


class CaptionBatcher:
    """Builds a batch from raw samples; bad samples are dropped and counted.

    A batch is a dict: `images` uint8 (B, 3, H, W); `tokens` (B, T) `<start> words <end>` padded with 0;
    `refs` (B, R, L) every reference as ids and `captions` their text (evaluation only); `image_ids` (B,);
    `keys`; `skipped` (reasons,).

    Args:
        vocab: The vocabulary.
        transform: Image transform to uint8 tensors.
        max_len: Most words kept per caption (longer captions are truncated).
        max_refs: Most references kept per image for scoring.
        train: Draw one random reference per image visit (else: the first, and all references in `refs`).
        seed: Seed of the per-visit caption choice.
    """

    def __init__(self, vocab: Vocabulary, transform: ImageTransform, max_len: int, max_refs: int, train: bool, seed=0):
        self.vocab, self.transform = vocab, transform
        self.max_len, self.max_refs = max_len, max_refs
        self.train, self.seed = train, seed
        self.buffers = ImageBuffers()

    def __call__(self, raw_samples: list[dict], counter: SkipCounter, epoch: int) -> dict:
        size = self.transform.size
        images = self.buffers.get(len(raw_samples), size)
        tokens, refs, captions, ids, keys = [], [], [], [], []
        for raw in raw_samples:
            try:
                sample = decode_sample(raw, draft_size=self.transform.resize_to)
                self.transform.write(sample.image, images[len(ids)].numpy())
            except SkipSample as skip:
                counter.add(skip.reason)
                log.debug("skipped sample %s: %s", raw.get("__key__"), skip)
                continue
            # Chosen from (seed, epoch, key), not from a stream RNG, so resuming never has to replay choices.
            rng = random.Random(stable_seed(self.seed, epoch, sample.key))
            caption = rng.choice(sample.captions) if self.train else sample.captions[0]
            tokens.append(self.vocab.encode(caption, self.max_len))
            if not self.train:
                refs.append([reference_ids(c, self.vocab, self.max_len) for c in sample.captions[: self.max_refs]])
                captions.append(sample.captions)
            ids.append(sample.image_id)
            keys.append(sample.key)
        batch = {
            "images": images[: len(ids)].permute(0, 3, 1, 2),  # (B, 3, H, W) viewed on channels-last memory
            "tokens": pad_sequences(tokens),
            "image_ids": torch.tensor(ids, dtype=torch.long),
            "keys": keys,
            "skipped": counter.take(),
        }
        if not self.train:
            batch["refs"] = _pad_refs(refs, self.max_refs, self.max_len)
            batch["captions"] = captions
        return batch


class ImageBuffers:
    """Hands out uninitialised uint8 (N, H, W, 3) batch buffers.

    Each image is written into its buffer once, pixel-interleaved as PIL decodes it: the (B, 3, H, W) view over
    it is channels-last, which timm's convolutions take as it is (no transpose in the worker, none on the device).

    In a dataloader worker the buffers are in shared memory, as `default_collate` allocates them, so sending the
    batch to the main process copies nothing. Fresh shared memory is slow to write the first time (a page fault
    per 4 KiB); a background thread allocates and faults in the next buffer while the current batch decodes, the
    way a double buffer works, so the decoding thread only ever writes to resident pages.
    """

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._next: dict[tuple[int, int], Future] = {}

    def __getstate__(self) -> dict:  # a worker starts with its own thread and no buffer in flight
        return {"_pool": None, "_next": {}}

    def get(self, num_images: int, size: int) -> torch.Tensor:
        if get_worker_info() is None:
            return torch.empty((num_images, size, size, 3), dtype=torch.uint8)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="capline-buffers")
        key = (num_images, size)
        ready = self._next.pop(key, None)
        buffer = ready.result() if ready is not None else _resident_shared_buffer(num_images, size)
        self._next = {key: self._pool.submit(_resident_shared_buffer, num_images, size)}
        return buffer


def _resident_shared_buffer(num_images: int, size: int) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(num_images * size * size * 3)
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage).view(num_images, size, size, 3)
    buffer.view(-1)[::_PAGE_SIZE].zero_()  # one write per page faults it in (torch releases the GIL meanwhile)
    return buffer


def _pad_refs(refs: list[list[list[int]]], max_refs: int, max_len: int) -> torch.Tensor:
    out = torch.zeros(len(refs), max_refs, max_len, dtype=torch.long)
    for i, image_refs in enumerate(refs):
        for j, ref in enumerate(image_refs):
            out[i, j, : len(ref)] = torch.tensor(ref, dtype=torch.long)
    return out
