"""Training throughput in images per second over all ranks."""

from __future__ import annotations

import time

import lightning as L


class ImagesPerSecond(L.Callback):
    """Logs `train/images_per_sec`: images of all ranks per second of wall time, averaged over `window` steps.

    Time spent in validation is excluded, so the figure is the training loop's own speed.
    """

    def __init__(self, window: int = 10):
        self.window = window
        self._start: float | None = None
        self._images = 0

    def _restart(self) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch["images"].shape[0]) * trainer.world_size
        if self._start is None:
            self._restart()
        elapsed = time.perf_counter() - self._start
        if (batch_idx + 1) % self.window == 0 and elapsed > 0:
            pl_module.log("train/images_per_sec", self._images / elapsed)
            self._restart()
