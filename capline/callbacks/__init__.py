"""Lightning callbacks: throughput, W&B sample tables."""

from capline.callbacks.coco_results import CocoTestResults
from capline.callbacks.samples import CaptionSamples
from capline.callbacks.throughput import ImagesPerSecond

__all__ = ["CaptionSamples", "CocoTestResults", "ImagesPerSecond"]
