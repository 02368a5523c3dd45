"""A callback the DDP tests add to the real CLI: what each rank trained on, and a digest of its encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RankRecorder(L.Callback):
    """Writes `<out_dir>/rank<k>.json`: the training keys of each epoch, and the encoder digest at the end."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.setdefault(trainer.current_epoch, []).extend(batch["keys"])

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.encoder.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"keys": self.keys, "encoder_sha256": digest.hexdigest(), "global_step": trainer.global_step}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
