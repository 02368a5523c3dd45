"""Alarms for the most common captioning failure: a decoder that ignores the image."""

from __future__ import annotations

COLLAPSE_CAUSES = (
    "too few steps or too low a learning rate, broken image preprocessing (dtype or scale), "
    "the image fed only at the first step and then forgotten, or heavy decoder dropout"
)


def collapse_warning(
    cider: float, cider_shuffled: float, unique_captions: float, num_images: int,
    min_unique: float = 0.05, max_shuffled_ratio: float = 0.85,
) -> str | None:  # fmt: skip
    """Returns a warning when captions collapse to a few, or score almost as well against other images' references.

    Args:
        cider: CIDEr-D of the captions against their own references.
        cider_shuffled: CIDEr-D of the same captions against the references of other images.
        unique_captions: Fraction of distinct captions.
        num_images: Images scored.
        min_unique: Below this fraction of distinct captions, captions have collapsed.
        max_shuffled_ratio: Above this ratio of shuffled to real CIDEr-D, captions do not depend on the image.
    """
    if num_images < 2:
        return None
    reasons = []
    if unique_captions < min_unique:
        reasons.append(f"only {round(unique_captions * num_images)} distinct captions for {num_images} images")
    if cider > 0 and cider_shuffled >= max_shuffled_ratio * cider:
        reasons.append(f"CIDEr-D {cider:.3f} is barely above {cider_shuffled:.3f} with the references of other images")
    if not reasons:
        return None
    return f"the decoder is ignoring the image ({'; '.join(reasons)}). Usual causes: {COLLAPSE_CAUSES}."
