"""`capline predict`: writes every image's caption, gathered from all ranks, once the predictions end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class CaptionPredictionWriter(BasePredictionWriter):
    """Writes `predictions.jsonl` (one `{"image_id", "caption", "key"}` line per test-shard sample, or
    `{"image_id", "caption", "file"}` per image file) and `predictions_coco.json` (COCO results format,
    `[{"image_id", "caption"}, ...]`); files that could not be decoded are listed in `predictions_unreadable.txt`.

    Args:
        output_dir: Where the files go (default: `trainer.default_root_dir`).
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._rows: list[dict] = []
        self._unreadable: list[tuple[str, str]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._rows, self._unreadable = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        field, names = ("file", batch["files"]) if "files" in batch else ("key", batch["keys"])
        self._rows += [{**row, field: name} for row, name in zip(prediction, names)]
        self._unreadable += [tuple(item) for item in batch.get("unreadable", [])]

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows, unreadable = _gather(self._rows), _gather(self._unreadable)
        if not trainer.is_global_zero:
            return
        folder = Path(self.output_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows.sort(key=lambda row: str(row.get("file", row.get("key"))))
        _write_atomic(folder / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        coco = [{"image_id": row["image_id"], "caption": row["caption"]} for row in rows]
        _write_atomic(folder / "predictions_coco.json", json.dumps(sorted(coco, key=lambda r: r["image_id"])))
        if len({row["image_id"] for row in rows}) < len(rows):
            log.warning("some images share an image_id (the number ending their file name); predictions_coco.json "
                        "holds each of their captions, predictions.jsonl tells them apart by file")  # fmt: skip
        log.info("wrote %d captions to %s and %s", len(rows), folder / "predictions.jsonl", "predictions_coco.json")
        if unreadable:
            listing = "".join(f"{path}\t{reason}\n" for path, reason in sorted(unreadable))
            _write_atomic(folder / "predictions_unreadable.txt", listing)
            shown = ", ".join(path for path, _ in sorted(unreadable)[:5])
            more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
            log.warning("skipped %d unreadable image(s): %s%s (all listed with the reason in %s)",
                        len(unreadable), shown, more, folder / "predictions_unreadable.txt")  # fmt: skip


def _gather(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
