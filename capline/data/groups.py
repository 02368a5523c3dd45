"""Passes over shards that read captions only: merging the samples of one image for evaluation, where a layout
writes one sample per caption (img2dataset), and every caption of a shard list (for its vocabulary).

Every image must be scored once, with all its references, exactly once across ranks and workers. One pass over
the evaluation shards, in the order the evaluation stream reads them, names each image's first sample its
*owner* and collects the image's captions under it; the stream then keeps only owners (each in one shard, so in
one slot) and hands them every caption.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from capline.data.decode import SkipCounter, SkipSample, image_member
from capline.data.layouts import LayoutReader
from capline.data.pipeline import _Stream, sample_id

log = logging.getLogger(__name__)


def image_group(raw: dict, reader: LayoutReader) -> tuple[str, list[str]]:
    """The image a sample shows (its group field, else its image bytes' hash) and its captions."""
    captions = reader(raw)
    if captions.group is not None:
        return captions.group, captions.captions
    return hashlib.blake2b(image_member(raw), digest_size=16).hexdigest(), captions.captions


def merge_image_samples(urls: list[str], reader: LayoutReader) -> dict[str, tuple[str, ...]]:
    """`{owner sample id: every caption of its image}`, the owner being the image's first usable sample."""
    owners: dict[str, str] = {}  # group -> owner sample id
    captions: dict[str, list[str]] = {}  # owner sample id -> captions
    samples = 0
    for url in urls:
        for raw in _Stream._read_shard(url, SkipCounter()):
            samples += 1
            try:
                group, texts = image_group(raw, reader)
            except SkipSample:
                continue  # counted when the evaluation stream meets the sample
            owner = owners.setdefault(group, sample_id(raw))
            captions.setdefault(owner, []).extend(texts)
    log.info("merged %d evaluation samples into %d images", samples, len(captions))
    return {owner: tuple(texts) for owner, texts in captions.items()}


def shard_captions(urls: list[str], reader: LayoutReader, counter: SkipCounter) -> Iterator[list[str]]:
    """The captions of every sample of `urls`, in order, without decoding an image; skips go to `counter`."""
    for url in urls:
        for raw in _Stream._read_shard(url, counter):
            try:
                yield reader(raw).captions
            except SkipSample as skip:
                counter.add(skip.reason)
