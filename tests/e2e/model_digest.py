"""A callback the SCST DDP test adds to the real CLI: a digest of every weight of the model on each rank."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class ModelDigest(L.Callback):
    """Writes `<out_dir>/rank<k>.json` at the end of training: the SHA-256 of the whole state dict and the step."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"sha256": digest.hexdigest(), "global_step": trainer.global_step}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
