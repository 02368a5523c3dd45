"""Validation/test caption metrics as a torchmetrics `Metric`, so their state syncs across DDP ranks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from capline.metrics.cider import CiderD

METRIC_NAMES = ("cider", "cider_shuffled", "unique_captions", "vocab_used", "mean_length", "num_images")


class CaptionMetrics(Metric):
    """CIDEr-D of generated token ids plus controls that expose degenerate captioners.

    `cider` equals `cider_d` on the decoded words, with document frequencies from the references of all updated
    images. `cider_shuffled` scores each caption against the references of another image (a fixed derangement
    after sorting by image id): a model that ignores the image scores about the same on both. The rest describe
    the generated captions: `unique_captions` (fraction of distinct captions), `vocab_used` (distinct word ids),
    `mean_length` (words) and `num_images`.

    Captions are stored as fixed-size token arrays so they concatenate across ranks. Results do not depend on the
    order of updates: images are sorted by id and an image id seen twice (DistributedSampler pads ranks with
    repeats) is scored once.

    Args:
        max_len: Words kept per caption; longer generated or reference captions are truncated, which changes
            CIDEr-D, so set it to at least the longest caption to match `cider_d` exactly.
        max_refs: Reference captions kept per image; more non-empty references than this is an error.
        end_id: Token that ends a caption.
        pad_id: Padding token; also ends a caption.
        **kwargs: Passed to `torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, max_len: int = 20, max_refs: int = 8, end_id: int = 2, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        if max_len < 1 or max_refs < 1:
            raise ValueError(f"max_len and max_refs must be positive, got {max_len} and {max_refs}")
        self.max_len, self.max_refs, self.end_id, self.pad_id = max_len, max_refs, end_id, pad_id
        self.add_state("preds", default=[], dist_reduce_fx="cat")  # list of (B, max_len)
        self.add_state("refs", default=[], dist_reduce_fx="cat")  # list of (B, max_refs, max_len)
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")  # list of (B,)

    def update(self, preds: Tensor, refs: Tensor, image_ids: Tensor) -> None:
        """Adds a batch of generated captions.

        Args:
            preds: (B, Lp) generated token ids without `<start>`; a caption ends at its first `end_id` or `pad_id`.
            refs: (B, R, Lr) reference token ids without `<start>`/`<end>`, padded with `pad_id`; an all-padding
                row is an absent reference. Ids may exceed the vocabulary (hashed out-of-vocabulary words).
            image_ids: (B,) image ids.
        """
        same_batch = preds.shape[:1] == refs.shape[:1] == image_ids.shape[:1]
        if preds.ndim != 2 or refs.ndim != 3 or image_ids.ndim != 1 or not same_batch:
            raise ValueError(
                f"expected preds (B, Lp), refs (B, R, Lr) and image_ids (B,), got {tuple(preds.shape)}, "
                f"{tuple(refs.shape)} and {tuple(image_ids.shape)}"
            )
        refs = self._cut(refs)
        has_ref = (refs != self.pad_id).any(dim=-1)  # (B, R)
        if refs.shape[1] > self.max_refs and has_ref[:, self.max_refs :].any():
            raise ValueError(f"an image has more than max_refs={self.max_refs} references; raise max_refs")
        if not has_ref.any(dim=1).all():
            missing = image_ids[~has_ref.any(dim=1)][0].item()
            raise ValueError(f"image {missing} has no reference caption; every image needs at least one")
        self.preds.append(_fit(self._cut(preds), self.max_len, self.pad_id))
        self.refs.append(_fit(_fit(refs, self.max_len, self.pad_id), self.max_refs, self.pad_id, dim=1))
        self.image_ids.append(image_ids.long())

    def compute(self) -> dict[str, Tensor]:
        """Returns the metrics named in `METRIC_NAMES` as float tensors."""
        image_ids, preds, refs = self._collect()
        if image_ids.size == 0:  # nothing could be read: no score, and 0 images
            empty = {name: torch.tensor(float("nan"), device=self.device) for name in METRIC_NAMES}
            return empty | {"num_images": torch.tensor(0.0, device=self.device)}
        scorer = CiderD()
        lengths = (preds != self.pad_id).sum(axis=1)
        values = {
            "cider": scorer.score_padded(preds, refs, self.pad_id).mean(),
            # Image i gets the caption of image i - 1: a derangement fixed by the image ids alone.
            "cider_shuffled": scorer.score_padded(np.roll(preds, 1, axis=0), refs, self.pad_id).mean(),
            "unique_captions": np.unique(preds, axis=0).shape[0] / image_ids.size,
            "vocab_used": np.unique(preds[preds != self.pad_id]).size,
            "mean_length": lengths.mean(),
            "num_images": image_ids.size,
        }
        return {name: torch.tensor(float(value), device=self.device) for name, value in values.items()}

    def per_sample(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-image results for sample tables (best and worst captions), gathered across ranks.

        Returns:
            image_ids (N,) long, cider (N,) float, preds (N, max_len) and refs (N, max_refs, max_len) token ids
            padded with `pad_id`, sorted by image id.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            image_ids, preds, refs = self._collect()
        cider = CiderD().score_padded(preds, refs, self.pad_id) if image_ids.size else np.zeros(0)
        return (
            torch.from_numpy(image_ids),
            torch.from_numpy(cider).float(),
            torch.from_numpy(preds),
            torch.from_numpy(refs),
        )

    def _cut(self, tokens: Tensor) -> Tensor:
        """Replaces everything from each caption's first `end_id` or `pad_id` on with `pad_id`."""
        ended = ((tokens == self.end_id) | (tokens == self.pad_id)).cumsum(dim=-1) > 0
        return tokens.masked_fill(ended, self.pad_id)

    def _collect(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns image ids, preds and refs as numpy arrays, sorted by image id, one row per image id."""
        if isinstance(self.image_ids, list) and not self.image_ids:
            empty = np.zeros((0, self.max_refs, self.max_len), np.int64)
            return empty[:, 0, 0], empty[:, 0], empty
        states = (self.image_ids, self.preds, self.refs)
        image_ids, preds, refs = (dim_zero_cat(state).cpu().numpy() for state in states)
        # Sorting by caption after image id makes the copy kept of a repeated image independent of rank order.
        order = np.lexsort((*preds.T[::-1], image_ids))
        image_ids, preds, refs = image_ids[order], preds[order], refs[order]
        first = np.concatenate([[True], image_ids[1:] != image_ids[:-1]])
        return image_ids[first], preds[first], refs[first]


def _fit(tokens: Tensor, size: int, pad_id: int, dim: int = -1) -> Tensor:
    """Pads with `pad_id` or truncates dimension `dim` to `size`."""
    tokens = tokens.long().narrow(dim, 0, min(size, tokens.shape[dim]))
    padding = list(tokens.shape)
    padding[dim] = size - tokens.shape[dim]
    return torch.cat([tokens, tokens.new_full(padding, pad_id)], dim=dim)
