"""Lightning callbacks: throughput, W&B sample tables."""

from capline.callbacks.throughput import ImagesPerSecond

__all__ = ["ImagesPerSecond"]
