"""Every reference caption of the training images, read once from the shards (for SCST's reward statistics)."""

from __future__ import annotations

import logging

from capline.data.collate import reference_ids
from capline.data.datamodule import DataConfigError
from capline.data.decode import SkipCounter, SkipSample
from capline.data.layouts import LayoutReader
from capline.data.pipeline import TrainStream
from capline.vocab import Vocabulary

log = logging.getLogger(__name__)


class MissingReferencesError(DataConfigError):
    """Training shards whose samples do not hold their image's reference captions."""


def training_references(
    urls: list[str], vocab: Vocabulary, max_len: int, max_refs: int, reader: LayoutReader | None = None
) -> list[list[list[int]]]:
    """Per training sample, its first `max_refs` reference captions as ids (as training batches carry them).

    Only the caption members are parsed (`reader`: the shards' layout, capline's by default); images are not
    decoded. Raises `MissingReferencesError` (one sentence) when no sample has captions, or when every sample
    holds a single caption (one sample per caption, as img2dataset writes them): SCST scores a sample against all
    of its image's references.
    """
    counter, refs, reader = SkipCounter(), [], reader or LayoutReader("capline")
    for url in urls:
        for raw in TrainStream._read_shard(url, counter):
            try:
                captions = reader(raw).captions
            except SkipSample:
                continue
            refs.append([reference_ids(c, vocab, max_len) for c in captions[:max_refs]])
    if not refs:
        raise MissingReferencesError(
            f"model.scst needs reference captions, but no sample of the {len(urls)} training shards has any"
        )
    if max(map(len, refs)) < 2:
        raise MissingReferencesError(
            f"model.scst scores each sample against all reference captions of its image, but every one of the "
            f"{len(refs)} training samples holds a single caption (one sample per caption, as img2dataset writes "
            f"them); write shards with one sample per image and all its captions (capline shards)"
        )
    return refs
