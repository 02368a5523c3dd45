"""A callback the preemption tests add to the real CLI: what each rank saw at every step boundary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from capline.preemption import received_signal


class StepProbe(L.Callback):
    """Appends `{"step", "signalled", "time"}` to `<out_dir>/rank<k>.jsonl` at each training batch end (before
    capline's Preemption callback acts on the same step, which Lightning runs last), so a test can tell at which
    step boundary a signal was first seen, and when.

    Args:
        out_dir: Folder of the records.
        min_step_s: Each step lasts at least this long (it sleeps out the rest) in the first `paced_attempts`
            attempts of a SLURM job (`SLURM_RESTART_COUNT`): a test that relies on SLURM's clock (a time limit) then
            knows how many steps those attempts make at most, however fast the machine, and the last one is quick.
        paced_attempts: How many attempts are paced (outside SLURM, a run is attempt 1).
    """

    def __init__(self, out_dir: str, min_step_s: float = 0.0, paced_attempts: int = 1):
        self.out_dir = Path(out_dir)
        self.min_step_s = min_step_s
        self.paced = int(os.environ.get("SLURM_RESTART_COUNT", 0)) < paced_attempts
        self._last = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        rest = self.min_step_s - (time.monotonic() - self._last)
        if self.paced and rest > 0:
            time.sleep(rest)
        self._last = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"step": trainer.global_step, "signalled": received_signal() is not None, "time": time.time()}
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class FailOnRank(L.Callback):
    """Raises in one rank at one step: a rank that fails while the others go on (the rank-failure tests)."""

    def __init__(self, rank: int = 1, step: int = 5):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")
