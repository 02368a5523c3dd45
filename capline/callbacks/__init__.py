"""Lightning callbacks: throughput, W&B sample tables, test results, prediction files, consumed samples."""

from capline.callbacks.coco_results import CocoTestResults
from capline.callbacks.consumed import ConsumedSamples
from capline.callbacks.predictions import CaptionPredictionWriter
from capline.callbacks.samples import CaptionSamples
from capline.callbacks.throughput import ImagesPerSecond

__all__ = ["CaptionPredictionWriter", "CaptionSamples", "CocoTestResults", "ConsumedSamples", "ImagesPerSecond"]
