"""SCST's reward: CIDEr-D of each caption against its image's references, `<end>` included, with the document
frequencies of the whole training corpus (computed once, cached next to `vocab.json`, stored in checkpoints).

Scoring `<end>` as a word, as self-critical.pytorch does, is what stops the policy from learning "bad endings"
(captions cut after "a" or "with") that plain CIDEr-D does not punish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from capline.metrics.cider import CiderD
from capline.vocab import Vocabulary

log = logging.getLogger(__name__)
END, PAD = Vocabulary.end_id, Vocabulary.pad_id


def append_end(refs: np.ndarray) -> np.ndarray:
    """(N, R, L) 0-padded ids -> (N, R, L + 1) with `<end>` after each reference that is not all padding."""
    lengths = (refs != PAD).sum(axis=-1)  # references hold no padding inside
    out = np.zeros(refs.shape[:-1] + (refs.shape[-1] + 1,), np.int64)
    out[..., :-1] = refs
    n, r = np.nonzero(lengths)
    out[n, r, lengths[n, r]] = END
    return out


class CiderReward:
    """Scores captions for SCST with CIDEr-D statistics fixed to a training corpus.

    Args:
        scorer: A `CiderD` built `from_references` of the corpus, each reference ending in `<end>`.
    """

    def __init__(self, scorer: CiderD):
        self.scorer = scorer

    @classmethod
    def from_references(cls, references: Sequence[Sequence[Sequence[int]]]) -> CiderReward:
        """From every training image's reference ids (without `<end>`; it is appended here)."""
        return cls(CiderD.from_references([[[*ref, END] for ref in image] for image in references]))

    def __call__(self, candidates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """CIDEr-D of each caption (N, L), ended by `<end>` or padding, against its references (N, R, L'),
        0-padded ids without `<end>`. Returns (N,) float32 on the CPU."""
        cands = candidates.cpu().numpy()
        refs = append_end(references.cpu().numpy())
        return torch.from_numpy(self.scorer.score_padded(cands, refs, pad_id=PAD)).float()

    def state_dict(self) -> dict:
        return self.scorer.state_dict()

    @classmethod
    def from_state_dict(cls, state: dict) -> CiderReward:
        return cls(CiderD.from_state_dict(state))


def cache_key(urls: list[str], vocab: Vocabulary, max_len: int, max_refs: int) -> str:
    """A digest of what the corpus statistics depend on: the shards (with size and mtime), vocabulary, limits."""
    shards = []
    for url in urls:
        path = url.removeprefix("file://")
        stat = os.stat(path) if os.path.isfile(path) else None
        shards.append([url, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    text = json.dumps([shards, vocab.words, max_len, max_refs, 4, 6.0])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def training_reward(datamodule) -> CiderReward:
    """The reward of a `CaptionDataModule`'s training corpus, from `cider-df-<digest>.pt` next to its `vocab.json`,
    or built from its training references and written there (one process builds while the others wait)."""
    from filelock import FileLock

    urls = datamodule.shards["train_shards"] or []
    key = cache_key(urls, datamodule.vocab, datamodule.max_len, datamodule.max_refs)
    path = Path(datamodule.vocab_file).parent / f"cider-df-{key}.pt"
    try:
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError:  # a read-only folder: build it in every process, without a cache
        return CiderReward.from_references(datamodule.train_references())
    try:
        if path.is_file():
            return CiderReward.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("SCST: counting CIDEr-D document frequencies over the training references (once, then cached)")
        reward = CiderReward.from_references(datamodule.train_references())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(reward.state_dict(), tmp)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            log.warning("SCST: could not cache the document frequencies in %s (%s)", path, err)
        return reward
    finally:
        lock.release()
