"""A W&B table of validation images with their generated caption, references and per-sample CIDEr-D."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

from capline.metrics.scene_truth import judge_caption

COLUMNS = ["kind", "image_id", "image", "generated", "references", "cider"]


class CaptionSamples(L.Callback):
    """Logs `val/samples` at every validation: the best and worst captioned images and a fixed set of images
    tracked across validations, so a run's progress can be read image by image. For synthetic scenes (batches
    that carry `scenes`) a `true` column says whether each caption is true of its scene (`judge_caption`): a
    high CIDEr-D alone does not make a caption right.

    Only rank 0 logs, from the images it scored itself; the per-sample CIDEr-D uses the document frequencies of
    the whole validation set.

    Args:
        num_best: Highest-scoring images per table.
        num_worst: Lowest-scoring images per table.
        num_tracked: Images shown at every validation (the lowest image ids of the first validation).
        thumbnail: Longest side of the images stored for the table, in pixels.
    """

    def __init__(self, num_best: int = 6, num_worst: int = 6, num_tracked: int = 6, thumbnail: int = 128):
        self.num_best, self.num_worst, self.num_tracked = num_best, num_worst, num_tracked
        self.thumbnail = thumbnail
        self.tracked: list[int] = []
        self._seen: dict[int, tuple[torch.Tensor, str, list[str]]] = {}

    def state_dict(self) -> dict:
        return {"tracked": self.tracked}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tracked = list(state_dict.get("tracked", []))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._seen = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or outputs is None or trainer.sanity_checking:
            return
        images = self._thumbnails(batch["images"])
        scenes = batch["scenes"].tolist() if "scenes" in batch else None
        for i, image_id in enumerate(batch["image_ids"].tolist()):
            caption = pl_module.vocab.decode(outputs["tokens"][i].tolist())
            true = judge_caption(caption.split(), scenes[i])[0] if scenes is not None else None
            self._seen[image_id] = (images[i], caption, batch["captions"][i], true)

    def _thumbnails(self, images: torch.Tensor) -> torch.Tensor:
        scale = self.thumbnail / max(images.shape[-2:])
        if scale >= 1:  # a copy: holding views would keep every batch's (shared, recyclable) buffer alive
            return images.to("cpu", copy=True)
        small = F.interpolate(images.float(), scale_factor=scale, mode="bilinear", antialias=True)
        return small.round().clamp(0, 255).to(torch.uint8).cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # Every rank computes the synced per-sample scores (a collective), rank 0 alone logs.
        image_ids, scores, *_ = pl_module.caption_metrics["val"].per_sample()
        if not trainer.is_global_zero or not self._seen:
            return
        scored = sorted(
            ((float(s), int(i)) for i, s in zip(image_ids.tolist(), scores.tolist()) if int(i) in self._seen),
            key=lambda t: (-t[0], t[1]),
        )
        if not self.tracked:
            self.tracked = sorted(self._seen)[: self.num_tracked]
        score_of = {i: s for s, i in scored}
        rows = [("best", i) for _, i in scored[: self.num_best]]
        rows += [("worst", i) for _, i in scored[::-1][: self.num_worst]]
        rows += [("tracked", i) for i in self.tracked if i in self._seen]
        with_truth = all(seen[3] is not None for seen in self._seen.values())
        self.columns = COLUMNS + ["true"] if with_truth else COLUMNS
        self.last_rows = [self._row(kind, i, score_of.get(i, float("nan")), with_truth) for kind, i in rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                data = [[*r[:2], wandb.Image(r[2].permute(1, 2, 0).numpy()), *r[3:]] for r in self.last_rows]
                # at the step Lightning logs this validation's metrics (as its LearningRateMonitor does): the
                # index of the batch just trained, one below trainer.global_step, so the W&B step never goes back
                step = trainer.fit_loop.epoch_loop._batches_that_stepped
                logger.log_table("val/samples", columns=self.columns, data=data, step=step)

    def _row(self, kind: str, image_id: int, score: float, with_truth: bool) -> list:
        image, caption, references, true = self._seen[image_id]
        row = [kind, image_id, image, caption, " | ".join(references), score]
        return row + [bool(true)] if with_truth else row
