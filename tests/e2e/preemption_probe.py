"""A callback the preemption tests add to the real CLI: what each rank saw at every step boundary."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from capline.preemption import received_signal


class StepProbe(L.Callback):
    """Appends `{"step", "signalled"}` to `<out_dir>/rank<k>.jsonl` at each training batch end (before capline's
    Preemption callback acts on the same step, which Lightning runs last), so a test can tell at which step
    boundary a signal was first seen."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"step": trainer.global_step, "signalled": received_signal() is not None})
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(line + "\n")
