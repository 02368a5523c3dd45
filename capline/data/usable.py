"""Looking at a split's first samples before training: which layout they are in, and whether any is usable."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

from capline.data.decode import SkipCounter, SkipSample, decode_sample
from capline.data.layouts import UnknownLayoutError, detect_layout, looks_like
from capline.data.pipeline import _Stream

log = logging.getLogger(__name__)

DETECT_SAMPLES = 16  # samples of the first shard the layout is told from
CHECK_SAMPLES = 256  # samples read, at most, to find one usable sample before training
CHECK_SHARDS = 16  # shards read, at most, for it


class NoUsableDataError(ValueError):
    """Shards whose layout is unknown or from which not one sample can be used (one sentence)."""


def _first_samples(urls: list[str], counter: SkipCounter, limit: int, max_shards: int) -> Iterator[dict]:
    """The first samples of the shards in list order; a stream closed early (curl's pipe) is not an error."""
    for url in urls[:max_shards]:
        samples = _Stream._read_shard(url, counter)
        try:
            yield from itertools.islice(samples, limit)
        finally:
            try:
                samples.close()
            except Exception as err:  # noqa: BLE001 -- a pipe closed before the end reports the reader's exit status
                log.debug("closing %s early: %r", url, err)


def _rank_zero_info(message: str) -> None:
    """Lightning's rank-zero INFO line, imported when first used: `capline shards` runs without Lightning."""
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)


def detect_shard_layout(urls: list[str], name: str, announce: Callable[[str], None] = _rank_zero_info) -> str:
    """The layout of a split's first shard, from its first samples; `announce` says it (by default on rank 0)."""
    samples = list(_first_samples(urls, SkipCounter(), DETECT_SAMPLES, max_shards=1))
    shard = PurePosixPath(urls[0]).name
    try:
        layout, evidence = detect_layout(samples)
    except UnknownLayoutError as err:
        raise NoUsableDataError(
            f"data.{name}: {shard}: {err}; capline reads a .jpg/.jpeg/.png/.webp image with a capline .json, "
            f"an img2dataset .txt/.json or a .txt of captions (data.format: capline, img2dataset or txt)"
        ) from None
    announce(f"data.format auto: data.{name} holds {layout} shards ({evidence} of {shard})")
    return layout


def check_usable(urls: list[str], name: str, batcher) -> None:
    """Raises `NoUsableDataError` in one sentence when none of the first samples of `urls` can be used.

    It gives the skip counts by reason and, when the samples look like another layout, the `data.format` to use.
    """
    counter, reasons, kinds, seen = SkipCounter(), Counter(), Counter(), 0
    for raw in _first_samples(urls, counter, CHECK_SAMPLES, CHECK_SHARDS):
        seen += 1
        try:
            decode_sample(raw, batcher.transform.resize_to, batcher.read_captions)
            return
        except SkipSample as skip:
            reasons[skip.reason] += 1
            kinds[looks_like(raw)] += 1
        if seen >= CHECK_SAMPLES:
            break
    reasons.update({r: n for r, n in counter.pending.items() if n})
    counts = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    shards = min(len(urls), CHECK_SHARDS)
    if not seen:
        raise NoUsableDataError(
            f"data.{name} has no usable sample: its first {shards} shard(s) hold no readable sample ({counts}); "
            f"the shards are empty, not tar files, or unreachable"
        )
    other = next((kind for kind, _ in kinds.most_common() if kind is not None), None)
    hint = ""
    if other not in (None, batcher.read_captions.layout):
        hint = f"; they look like {other} shards: set data.format: {other}"
    raise NoUsableDataError(
        f"data.{name} has no usable sample: the first {seen} samples ({shards} shard(s)) were all skipped "
        f"({counts}){hint}"
    )
