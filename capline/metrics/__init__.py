"""Caption metrics: fast CIDEr-D, the validation metric and the official COCO evaluation.

The names are imported on first use, so `capline evaluate` (official metrics only) starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capline.metrics.caption_metric import CaptionMetrics
    from capline.metrics.cider import CiderD, cider_d
    from capline.metrics.coco_eval import evaluate_coco, load_coco_references, load_coco_results
    from capline.metrics.scene_truth import SceneTruth

_MODULE_OF = {
    "CaptionMetrics": "caption_metric",
    "CiderD": "cider",
    "cider_d": "cider",
    "evaluate_coco": "coco_eval",
    "load_coco_references": "coco_eval",
    "load_coco_results": "coco_eval",
    "SceneTruth": "scene_truth",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
