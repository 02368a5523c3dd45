"""From raw samples to a model-ready batch: decode, resize/crop to uint8, pick and encode captions, pad."""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, get_worker_info

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
        self.buffers = ImageBuffers()

    def __call__(self, raw_samples: list[dict], counter: SkipCounter, epoch: int) -> dict:
        size = self.transform.size
        images, slot = self.buffers.get(len(raw_samples), size)
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
        batch = {
            "images": images[: len(ids)].permute(0, 3, 1, 2),  # (B, 3, H, W) viewed on channels-last memory
            "tokens": pad_sequences(tokens),
            "image_ids": torch.tensor(ids, dtype=torch.long),
            "keys": keys,
            "skipped": counter.take(),
        }
        if self.train and self.train_refs:
            batch["refs"] = _pad_refs(refs, self.max_refs, self.max_len)  # (B, R, L)
        if slot >= 0:
            batch["buffer_slot"] = slot  # taken out again by RecyclingDataLoader in the main process
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


class ImageBuffers:
    """Hands out uninitialised uint8 (N, H, W, 3) batch buffers, and recycles them across batches.

    Each image is written into its buffer once, pixel-interleaved as PIL decodes it: the (B, 3, H, W) view over
    it is channels-last, which timm's convolutions take as it is (no transpose in the worker, none on the device).

    In a dataloader worker the buffers are in shared memory, as `default_collate` allocates them, so handing a
    batch to the main process copies nothing. Fresh shared memory is slow to write the first time (a page fault
    per 4 KiB page, a few percent of the decode time), so each worker keeps `slots_per_worker` buffers and reuses
    one once the main process no longer holds any tensor on it: `RecyclingDataLoader` tracks that with a weak
    reference to each batch's storage and clears the slot's flag in `flags` (shared, one byte per slot; 1 = in
    use). With every slot held (user code keeping batches), a worker takes fresh memory: nothing is overwritten
    while anything can still see it.
    """

    def __init__(self, slots_per_worker: int = 8):
        self.slots_per_worker = slots_per_worker
        self.flags: torch.Tensor | None = None  # set by `start` in the main process, before workers start
        self._slots: dict[int, torch.Tensor] = {}  # a worker's own flat buffers, by slot

    def __getstate__(self) -> dict:  # a worker starts with its own (empty) set of buffers
        return {"slots_per_worker": self.slots_per_worker, "flags": self.flags, "_slots": {}}

    def start(self, num_workers: int) -> torch.Tensor | None:
        """Called by the loader before its workers start; returns the slot flags it must clear."""
        self.flags = torch.zeros(num_workers * self.slots_per_worker, dtype=torch.uint8).share_memory_()
        return self.flags

    def get(self, num_images: int, size: int) -> tuple[torch.Tensor, int]:
        """A buffer for `num_images` images and its slot (-1: not recycled)."""
        shape, numel = (num_images, size, size, 3), num_images * size * size * 3
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=torch.uint8), -1
        flags = self.flags
        if flags is not None and (info.id + 1) * self.slots_per_worker <= flags.numel():
            first = info.id * self.slots_per_worker
            free = (flags[first : first + self.slots_per_worker] == 0).nonzero()
            if free.numel():
                slot = first + int(free[0])
                buffer = self._slots.get(slot)
                if buffer is None or buffer.numel() < numel:
                    buffer = self._slots[slot] = _shared_buffer(numel)
                flags[slot] = 1
                return buffer[:numel].view(shape), slot
        return _shared_buffer(numel).view(shape), -1


def _shared_buffer(numel: int) -> torch.Tensor:
    """`numel` uninitialised bytes of shared memory, allocated the way `default_collate` does in workers."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))


class RecyclingDataLoader(DataLoader):
    """A `DataLoader` over a stream whose batcher has `ImageBuffers`: it frees a worker's batch buffer for reuse
    once no tensor in this process refers to it any more (checked as each batch arrives).

    With `stream_state` (the data module, for the training stream), it is resumable the way Lightning checks for:
    `state_dict`/`load_state_dict` hand the stream's position to and from the checkpoint.
    """

    def __init__(self, *args, stream_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_state = stream_state

    def state_dict(self) -> dict:
        return self.stream_state.state_dict() if self.stream_state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.stream_state is not None:
            self.stream_state.load_state_dict(state_dict)

    def __iter__(self):
        buffers = getattr(getattr(self.dataset, "make_batch", None), "buffers", None)
        recycling = bool(self.num_workers) and isinstance(buffers, ImageBuffers)
        flags = buffers.start(self.num_workers) if recycling else None
        held: dict[int, StorageWeakRef] = {}
        for batch in join_worker_parts(super().__iter__(), flags):
            if flags is None:
                yield batch
                continue
            for slot in [s for s, ref in held.items() if ref.expired()]:
                flags[slot] = 0
                del held[slot]
            slot = batch.pop("buffer_slot", -1)
            if slot >= 0:
                held[slot] = StorageWeakRef(batch["images"].untyped_storage())
            yield batch


def join_worker_parts(batches: Iterator[dict], flags: torch.Tensor | None = None) -> Iterator[dict]:
    """Joins the parts of each training batch that the workers of a rank make (`TrainStream` marks them
    `part`: (worker, num_workers); they arrive one after the other, in worker order); other batches pass.
    The parts' buffers are copied out, so their slots in `flags` are freed at once."""
    parts: list[dict] = []
    for batch in batches:
        if "part" not in batch:
            yield batch
            continue
        parts.append(batch)
        if len(parts) == batch["part"][1]:
            assert [p["part"][0] for p in parts] == list(range(len(parts))), "parts out of worker order"
            joined = join_parts(parts)
            for slot in (p.get("buffer_slot", -1) for p in parts):
                if slot >= 0 and flags is not None:
                    flags[slot] = 0
            parts = []
            yield joined


def join_parts(parts: list[dict]) -> dict:
    """One batch from its parts: images, ids, tokens and references concatenated, skip counts summed."""
    batch = {}
    for name, first in parts[0].items():
        values = [p[name] for p in parts]
        if name in ("part", "buffer_slot"):
            continue
        if name == "images":  # (B, 3, H, W) viewed on channels-last memory, like each part
            batch[name] = torch.cat([v.permute(0, 2, 3, 1) for v in values]).permute(0, 3, 1, 2)
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


def _pad_refs(refs: list[list[list[int]]], max_refs: int, max_len: int) -> torch.Tensor:
    out = torch.zeros(len(refs), max_refs, max_len, dtype=torch.long)
    for i, image_refs in enumerate(refs):
        for j, ref in enumerate(image_refs):
            out[i, j, : len(ref)] = torch.tensor(ref, dtype=torch.long)
    return out
