"""The captioning loss."""

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy over non-padding targets, in float32 whatever the autocast dtype.

    Args:
        logits: (B, T, V) scores for the next word.
        targets: (B, T) word ids, `pad_id` where there is no word.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)
