"""`CaptionCheckpoint`: Lightning's `ModelCheckpoint`, plus `last.ckpt` at the step where `fit` ends."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class CaptionCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` whenever `fit` ends (max_steps, max_epochs, early stopping, the non-finite guard).

    Lightning's `ModelCheckpoint` writes `last.ckpt` only beside its regular saves (each validation, each
    `every_n_train_steps`), and at the end of training only if it never wrote one: a run whose `max_steps` is not
    a multiple of `val_check_interval` kept the steps after its last validation nowhere. A preempted run ends by
    an exception and writes `preempt.ckpt` instead (`capline.preemption`).
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and trainer.global_step > 0:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
