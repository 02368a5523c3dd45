"""From raw samples to a model-ready batch: decode, resize/crop to uint8, pick and encode captions, pad."""

from __future__ import annotations

import logging
import random
import zlib

import numpy as np
import torch
from PIL import Image

from capline.data.buffers import BatchPlace, ImageBuffers
from capline.data.decode import SkipCounter, SkipSample, decode_sample
from capline.data.elastic import stable_seed
from capline.data.layouts import LayoutReader
from capline.data.pipeline import pad_sequences
from capline.data.synthetic import encode_scene
from capline.vocab import Vocabulary, tokenize

log = logging.getLogger(__name__)

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

    def input_box(self, box: list[float], width: int, height: int) -> list[float]:
        """Maps a box `[x0, y0, x1, y1]` in fractions of a `width` x `height` image to fractions of the model
        input this transform makes of it (after the resize and centre crop), clipped to it."""
        scale = self.resize_to / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        x0, y0, x1, y1 = box
        mapped = [(x0 * new_w - left), (y0 * new_h - top), (x1 * new_w - left), (y1 * new_h - top)]
        return [min(max(v / self.size, 0.0), 1.0) for v in mapped]

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
        train_refs: Training batches carry every reference in `refs` too (SCST scores samples against them).
        read_captions: Reads the captions of the shards' layout (default: capline's own).
    """

    def __init__(
        self, vocab: Vocabulary, transform: ImageTransform, max_len: int, max_refs: int, train: bool, seed=0,
        train_refs: bool = False, read_captions: LayoutReader | None = None,
    ):  # fmt: skip
        self.read_captions = read_captions or LayoutReader("capline")
        self.vocab, self.transform = vocab, transform
        self.max_len, self.max_refs = max_len, max_refs
        self.train, self.seed = train, seed
        self.train_refs = train_refs
        self.buffers = ImageBuffers(transform.size)

    def __call__(self, raw_samples: list[dict], counter: SkipCounter, epoch: int, place: BatchPlace | None = None):
        """The batch of `raw_samples`; `place`: where they go in the rank's training batch."""
        images, where = self.buffers.get(len(raw_samples), place)
        tokens, refs, captions, ids, keys, scenes = [], [], [], [], [], []
        for raw in raw_samples:
            try:
                sample = decode_sample(raw, self.transform.resize_to, self.read_captions)
                self.transform.write(sample.image, images[len(ids)].numpy())
            except SkipSample as skip:
                counter.add(skip.reason)
                log.debug("skipped sample %s: %s", raw.get("__key__"), skip)
                continue
            # Chosen from (seed, epoch, key), not from a stream RNG, so resuming never has to replay choices.
            rng = random.Random(stable_seed(self.seed, epoch, sample.key))
            caption = rng.choice(sample.captions) if self.train else sample.captions[0]
            tokens.append(self.vocab.encode(caption, self.max_len))
            if self.train and self.train_refs:
                refs.append([reference_ids(c, self.vocab, self.max_len) for c in sample.captions[: self.max_refs]])
            if not self.train:
                refs.append([reference_ids(c, self.vocab, self.max_len) for c in sample.captions[: self.max_refs]])
                captions.append(sample.captions)
                scenes.append(self._scene(sample))
            ids.append(sample.image_id)
            keys.append(sample.key)
        batch = self.buffers.batch_entries(images[: len(ids)], where) | {  # images (B, 3, H, W), channels-last
            "tokens": pad_sequences(tokens),
            "image_ids": torch.tensor(ids, dtype=torch.long),
            "keys": keys,
            "skipped": counter.take(),
        }
        if self.train and self.train_refs:
            batch["refs"] = _pad_refs(refs, self.max_refs, self.max_len)  # (B, R, L)
        if not self.train:
            batch["refs"] = _pad_refs(refs, self.max_refs, self.max_len)
            batch["captions"] = captions
            if scenes and all(scene is not None for scene in scenes):  # synthetic scenes: their truth travels along
                batch["scenes"] = torch.tensor([codes for codes, _ in scenes], dtype=torch.long)  # (B, 7)
                batch["scene_boxes"] = torch.tensor([boxes for _, boxes in scenes], dtype=torch.float32)  # (B, 2, 4)
        return batch

    def _scene(self, sample) -> tuple[list[int], list[list[float]]] | None:
        encoded = encode_scene(sample.scene)
        if encoded is None:
            return None
        width, height = sample.image.size
        return encoded[0], [self.transform.input_box(box, width, height) for box in encoded[1]]


def _pad_refs(refs: list[list[list[int]]], max_refs: int, max_len: int) -> torch.Tensor:
    out = torch.zeros(len(refs), max_refs, max_len, dtype=torch.long)
    for i, image_refs in enumerate(refs):
        for j, ref in enumerate(image_refs):
            out[i, j, : len(ref)] = torch.tensor(ref, dtype=torch.long)
    return out
