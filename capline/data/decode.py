"""Turning one raw WebDataset sample into a checked image and its captions, or a counted skip."""

from __future__ import annotations

import io
import json
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch
from PIL import Image

# Decompression bombs are refused by pixel count (PIL's own limit only warns below 2x its default).
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Every reason a sample can be skipped, in the fixed order used by the per-batch skip counts.
SKIP_REASONS = (
    "corrupt_image",
    "missing_image",
    "missing_captions",
    "bad_json",
    "empty_captions",
    "image_too_large",
    "broken_shard",
    "bad_text",  # a `.txt` caption member that is not UTF-8 text
    "other_layout",  # the sample's members fit another layout than the one read (mixed shards)
)


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Counts skips by reason in one process; `take()` hands over what was counted since the last call."""

    def __init__(self):
        self.pending = Counter()

    def add(self, reason: str) -> None:
        self.pending[reason] += 1

    def take(self) -> torch.Tensor:
        counts = torch.tensor([self.pending.get(r, 0) for r in SKIP_REASONS], dtype=torch.long)
        self.pending.clear()
        return counts


@dataclass
class Sample:
    key: str
    image_id: int
    image: Image.Image
    captions: list[str]
    scene: dict | None = None  # what the synthetic generator drew (`synthetic.scene_record`), when the json has it


@dataclass
class Captions:
    """What a layout reads from a sample's text members (see `capline.data.layouts`)."""

    image_id: int
    captions: list[str]
    scene: dict | None = None
    group: str | None = None  # samples with the same group show one image (img2dataset: one sample per caption)


def image_id_to_int(image_id) -> int:
    """COCO ids are ints; any other id, or an int outside int64, is mapped to a stable non-negative int."""
    try:
        value = int(image_id)
        if -(2**63) <= value < 2**63:  # batches carry ids in an int64 tensor
            return value
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        pass
    return zlib.crc32(str(image_id).encode("utf-8", "surrogatepass")) & 0x7FFFFFFF  # JSON may hold "\ud800"


def image_id_for(path: str) -> int:
    """The file name's number: all of it, or its digits after a last `_`, `-` or `.` (COCO's
    `COCO_val2014_000000391895.jpg` is 391895); else a stable hash of the name."""
    stem = PurePath(path).stem
    digits = re.search(r"(?:^|[_.-])(\d{1,18})$", stem)
    return int(digits.group(1)) if digits else zlib.crc32(stem.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF


def parse_meta(raw: bytes | None) -> tuple[int, list[str], dict | None]:
    """Parses `<key>.json`; returns (image_id, non-empty captions, scene or None) or raises `SkipSample`."""
    if raw is None:
        raise SkipSample("missing_captions", "no .json member")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, an int over 4300 digits; nested too deep
        raise SkipSample("bad_json", str(err)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), list):
        raise SkipSample("bad_json", 'expected {"image_id": ..., "captions": [...]}')
    captions = [c.strip() for c in meta["captions"] if isinstance(c, str) and c.strip()]
    if not captions:
        raise SkipSample("empty_captions", "no non-empty caption")
    scene = meta.get("scene")
    return image_id_to_int(meta.get("image_id")), captions, scene if isinstance(scene, dict) else None


def open_image(raw: bytes, draft_size: int | None = None) -> Image.Image:
    """Decodes image bytes to RGB; JPEGs much larger than `draft_size` are decoded at reduced scale (faster)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise SkipSample("image_too_large", f"{img.width}x{img.height} pixels")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for broken data (OSError, SyntaxError, ValueError...)
        raise SkipSample("corrupt_image", f"{type(err).__name__}: {err}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts grayscale, 16-bit, palette, CMYK and alpha images to 8-bit RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 65535 is white: stretching to the image's own maximum would turn a dark image bright.
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) // 257).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def read_capline(raw: dict) -> Captions:
    """capline's own layout: the captions from `<key>.json` = `{"image_id": ..., "captions": [...]}`."""
    image_id, captions, scene = parse_meta(raw.get("json"))
    return Captions(image_id, captions, scene)


def image_member(raw: dict) -> bytes:
    """The bytes of a raw sample's image member (`.jpg`, `.jpeg`, `.png` or `.webp`) or raises `SkipSample`."""
    data = next((raw[ext] for ext in IMAGE_EXTS if ext in raw), None)
    if data is None:
        raise SkipSample("missing_image", "no .jpg, .jpeg, .png or .webp member")
    return data


def decode_sample(
    raw: dict, draft_size: int | None = None, read_captions: Callable[[dict], Captions] = read_capline
) -> Sample:
    """Decodes a raw sample dict (`__key__`, an image and caption members) or raises `SkipSample`.

    `read_captions` reads the caption members of the shards' layout (`capline.data.layouts.LayoutReader`); an
    evaluation stream that merged the samples of one image puts all its references in `raw["__refs__"]`.
    """
    meta = read_captions(raw)
    captions = list(raw.get("__refs__") or meta.captions)
    return Sample(raw["__key__"], meta.image_id, open_image(image_member(raw), draft_size), captions, meta.scene)
