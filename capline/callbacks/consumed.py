"""What every training batch held, written down so that anyone can check what a run saw."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class ConsumedSamples(L.Callback):
    """Appends `{"epoch", "step", "rank", "keys"}` for every training batch, one JSON line, to
    `<default_root_dir>/consumed/rank<R>.jsonl`; `step` is the optimizer step the batch trains.

    A resumed run first drops, from every rank's file, the records of the steps from its checkpoint on (a killed
    run may have trained them, but the checkpoint does not hold them, and they are trained again now): the files
    then tell what the whole run trained on, across kills and changes in the number of processes.
    """

    def __init__(self) -> None:
        self._file = None

    def on_train_start(self, trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir) / "consumed"
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            for path in folder.glob("rank*.jsonl"):
                _keep_steps_before(path, trainer.global_step)
        trainer.strategy.barrier("consumed_samples")
        self._file = open(folder / f"rank{trainer.global_rank}.jsonl", "a")  # noqa: SIM115 -- open for the run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "rank": trainer.global_rank,
                  "keys": list(batch["keys"])}  # fmt: skip
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _keep_steps_before(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
