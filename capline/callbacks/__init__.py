"""Lightning callbacks: throughput, W&B sample tables, test results and prediction files."""

from capline.callbacks.coco_results import CocoTestResults
from capline.callbacks.predictions import CaptionPredictionWriter
from capline.callbacks.samples import CaptionSamples
from capline.callbacks.throughput import ImagesPerSecond

__all__ = ["CaptionPredictionWriter", "CaptionSamples", "CocoTestResults", "ImagesPerSecond"]
