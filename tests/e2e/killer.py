"""A callback the elastic-resume tests add to the real CLI: every rank SIGKILLs itself as a given step starts."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs this process as optimizer step `step` starts: no teardown, no checkpoint, like a lost machine."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
