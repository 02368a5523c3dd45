"""`capline test`: writes the generated captions as a COCO results file and scores them with the official metrics."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch.distributed as dist

from capline.module import ALREADY_REDUCED

log = logging.getLogger(__name__)


class CocoTestResults(L.Callback):
    """Collects every rank's test captions, writes `[{"image_id", "caption"}, ...]` and logs the official
    COCO metrics (`test/Bleu_4`, `test/METEOR`, `test/ROUGE_L`, `test/CIDEr`, ...) computed by pycocoevalcap.

    Args:
        results_path: Where to write the results JSON (default: `<default_root_dir>/test_results.json`).
        official_metrics: Also run pycocoevalcap (needs Java); SPICE runs only when its models are present.
    """

    def __init__(self, results_path: str | None = None, official_metrics: bool = True):
        self.results_path = results_path
        self.official_metrics = official_metrics
        self._rows: list[tuple[int, str, list[str]]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        for image_id, tokens, refs in zip(batch["image_ids"].tolist(), outputs["tokens"].tolist(), batch["captions"]):
            self._rows.append((image_id, pl_module.vocab.decode(tokens), list(refs)))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows = self._gather(self._rows)
        scores: dict[str, float] = {}
        if trainer.is_global_zero:
            results = {image_id: caption for image_id, caption, _ in rows}
            path = Path(self.results_path or os.path.join(trainer.default_root_dir, "test_results.json"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in sorted(results.items())]))
            log.info("wrote %d test captions to %s", len(results), path)
            scores = self._score(rows)
        scores = trainer.strategy.broadcast(scores)
        if scores:
            pl_module.log_dict({f"test/{name}": value for name, value in scores.items()}, **ALREADY_REDUCED)

    @staticmethod
    def _gather(rows: list) -> list:
        if not (dist.is_available() and dist.is_initialized()):
            return rows
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]

    def _score(self, rows: list) -> dict[str, float]:
        if not self.official_metrics:
            return {}
        if shutil.which("java") is None:
            log.warning("official COCO metrics skipped: Java is not installed (pycocoevalcap needs it)")
            return {}
        from capline.metrics import evaluate_coco

        references = {image_id: refs for image_id, _, refs in rows}
        results = {image_id: caption for image_id, caption, _ in rows}
        return evaluate_coco(references, results, spice=True)
