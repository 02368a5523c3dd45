"""The collapse alarm: an image-blind decoder trained for a few steps triggers the warning; a healthy one does not."""

import logging

import lightning as L
import pytest
import torch

from capline.data.datamodule import CaptionDataModule
from capline.metrics.diagnostics import collapse_warning
from capline.models import ShowTellDecoder, TimmEncoder
from capline.module import CaptionModule


def test_collapse_warning_rules():
    assert collapse_warning(2.0, 0.3, 0.8, 100) is None
    assert "ignoring the image" in collapse_warning(2.0, 0.3, 0.02, 100)  # 2 distinct captions
    message = collapse_warning(0.5, 0.48, 0.9, 100)
    assert "other images" in message and "learning rate" in message


class ImageBlindModule(CaptionModule):
    """The encoder's features are zeroed: the decoder cannot see the image."""

    def encode(self, images, keys=None):
        return super().encode(images, keys) * 0

    def _eval_step(self, batch, stage):
        batch = {**batch, "images": torch.zeros_like(batch["images"])}
        return super()._eval_step(batch, stage)


def test_image_blind_decoder_triggers_the_warning(synthetic_data, caplog, tmp_path):
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet18", img_size=64, crop_pct=1.0)
    module = ImageBlindModule(
        encoder, lambda v, f: ShowTellDecoder(v, f, 32, 32, dropout=0.0), synthetic_data["vocab"], max_len=16
    )
    data = CaptionDataModule(
        train_shards=synthetic_data["train_shards"], val_shards=synthetic_data["val_shards"],
        vocab=synthetic_data["vocab"], global_batch_size=32, num_workers=0, max_len=16,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=8, val_check_interval=8, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="capline.module"):
        trainer.fit(module, datamodule=data)
    warnings = [r.getMessage() for r in caplog.records if "ignoring the image" in r.getMessage()]
    assert len(warnings) == 1
    assert trainer.callback_metrics["val/cider_shuffled"] >= 0.85 * trainer.callback_metrics["val/cider"]


@pytest.mark.parametrize("unique", [0.5, 1.0])
def test_no_warning_for_healthy_numbers(unique):
    assert collapse_warning(cider=3.0, cider_shuffled=0.4, unique_captions=unique, num_images=500) is None
