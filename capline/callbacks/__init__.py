"""Lightning callbacks: the end-of-fit checkpoint, throughput, W&B sample tables, test results, prediction files,
consumed samples."""

from capline.callbacks.checkpoint import CaptionCheckpoint
from capline.callbacks.coco_results import CocoTestResults
from capline.callbacks.consumed import ConsumedSamples
from capline.callbacks.predictions import CaptionPredictionWriter
from capline.callbacks.samples import CaptionSamples
from capline.callbacks.throughput import ImagesPerSecond

__all__ = [
    "CaptionCheckpoint",
    "CaptionPredictionWriter",
    "CaptionSamples",
    "CocoTestResults",
    "ConsumedSamples",
    "ImagesPerSecond",
]
