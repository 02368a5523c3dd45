"""The caption shard layouts capline reads, and telling them apart from a shard's first samples.

- `capline`: `<key>.json` = `{"image_id": ..., "captions": [...]}`, all references of the image in one sample
  (what `capline shards` writes).
- `img2dataset`: one sample per caption: `<key>.txt` (the caption) and `<key>.json` (`caption`, `url`, `key`,
  `status`, `width`, ..., `sha256`), as img2dataset's webdataset output has them. The caption is the `.txt`, or the
  JSON's `caption`. Samples of one image are merged for evaluation by `group_field` (the image url by default).
- `txt`: `<key>.txt` with every caption of the image, one per line (CLIP-benchmark's `wds_mscoco_captions`,
  `wds_flickr8k`, `wds_flickr30k`).

In all three the image is `.jpg`, `.jpeg`, `.png` or `.webp`.
"""

from __future__ import annotations

import json
from collections import Counter

from capline.data.decode import Captions, SkipSample, image_id_for, image_id_to_int, read_capline

LAYOUTS = ("capline", "img2dataset", "txt")
FORMATS = ("auto", *LAYOUTS)  # the values of `data.format`
# Skip reasons that mean "no captions where this layout keeps them": the sample may be of another layout.
_CAPTION_REASONS = ("missing_captions", "bad_json", "empty_captions", "bad_text")
_IMG2DATASET_FIELDS = ("caption", "url", "key", "status")


class UnknownLayoutError(ValueError):
    """Samples that fit none of the layouts."""


def _text(raw: dict) -> str:
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample("bad_text", ".txt is not UTF-8 text") from None
    if "\x00" in text:
        raise SkipSample("bad_text", ".txt holds binary data")
    return text


def _json_dict(raw: dict) -> dict | None:
    try:
        meta = json.loads(raw["json"].decode("utf-8")) if raw.get("json") is not None else None
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def read_img2dataset(raw: dict, group_field: str | None = "url") -> Captions:
    """One caption from `.txt` (else the JSON's `caption`); the image id from the url's file name."""
    meta = _json_dict(raw) or {}
    if raw.get("txt") is not None:
        caption = " ".join(_text(raw).split())
    elif isinstance(meta.get("caption"), str):
        caption = " ".join(meta["caption"].split())
    else:
        raise SkipSample("missing_captions", "no .txt member and no 'caption' in .json")
    if not caption:
        raise SkipSample("empty_captions", "empty caption")
    url = meta.get("url")
    image_id = image_id_for(url) if isinstance(url, str) and url else image_id_to_int(raw["__key__"])
    group = meta.get(group_field) if group_field else None
    if group is None and group_field:
        group = meta.get("sha256")  # img2dataset's hash of the image bytes (compute_hash, on by default)
    return Captions(image_id, [caption], group=None if group is None else str(group))


def read_txt(raw: dict) -> Captions:
    """Every non-empty line of `.txt` is a caption of the image; the id is a stable number from the key."""
    if raw.get("txt") is None:
        raise SkipSample("missing_captions", "no .txt member")
    captions = [" ".join(line.split()) for line in _text(raw).splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise SkipSample("empty_captions", "empty .txt")
    return Captions(image_id_to_int(raw["__key__"]), captions)


def looks_like(raw: dict) -> str | None:
    """The layout a raw sample's caption members fit, or None."""
    meta = _json_dict(raw)
    if meta is not None and isinstance(meta.get("captions"), list):
        return "capline"
    if meta is not None and any(field in meta for field in _IMG2DATASET_FIELDS):
        return "img2dataset" if raw.get("txt") is not None or isinstance(meta.get("caption"), str) else None
    return "txt" if raw.get("txt") is not None else None


def detect_layout(samples: list[dict]) -> tuple[str, str]:
    """The layout most of `samples` fit, and the evidence in words (for the log line).

    Raises:
        UnknownLayoutError: If none of them fits a layout.
    """
    votes = Counter(layout for layout in map(looks_like, samples) if layout is not None)
    if not votes:
        members = sorted({ext for raw in samples for ext in raw if not ext.startswith("__")})
        raise UnknownLayoutError(
            f"the first {len(samples)} samples fit no shard layout (members: {', '.join(members) or 'none'})"
        )
    layout, count = votes.most_common(1)[0]
    members = "+".join(sorted({ext for raw in samples for ext in raw if not ext.startswith("__")}))
    return layout, f"{count} of the first {len(samples)} samples, members {members}"


class LayoutReader:
    """Reads the captions of a raw sample in one layout; picklable, so dataloader workers get a copy.

    A sample without captions where the layout keeps them, but whose members fit another layout, is skipped as
    `other_layout` (mixed shards), not as a missing or broken caption file.
    """

    def __init__(self, layout: str = "capline", group_field: str | None = "url"):
        if layout not in LAYOUTS:
            raise ValueError(f"data.format {layout!r} is not one of {FORMATS}")
        self.layout, self.group_field = layout, group_field

    def __call__(self, raw: dict) -> Captions:
        try:
            if self.layout == "img2dataset":
                return read_img2dataset(raw, self.group_field)
            return read_txt(raw) if self.layout == "txt" else read_capline(raw)
        except SkipSample as skip:
            other = looks_like(raw) if skip.reason in _CAPTION_REASONS else None
            if other is not None and other != self.layout:
                raise SkipSample("other_layout", f"a {other} sample in {self.layout} shards") from None
            raise

    @property
    def one_sample_per_caption(self) -> bool:
        """Whether an image's captions are spread over several samples (merged for evaluation)."""
        return self.layout == "img2dataset" and self.group_field is not None
