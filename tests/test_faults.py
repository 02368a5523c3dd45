"""Numerical faults skip the step and are counted; a run of them stops training with a checkpoint."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from capline.data.datamodule import CaptionDataModule
from capline.models import ShowTellDecoder, TimmEncoder
from capline.module import CaptionModule
from capline.preflight import redact


class PoisonedModule(CaptionModule):
    """Returns a NaN loss on the listed steps."""

    def __init__(self, *args, nan_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_steps = set(nan_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
            self._loss_finite = torch.isfinite(loss.detach())
        return loss


def run(data: dict, tmp_path, nan_steps, max_nonfinite: int, steps: int):
    torch.manual_seed(0)
    module = PoisonedModule(
        TimmEncoder("resnet18", img_size=64, crop_pct=1.0),
        lambda v, f: ShowTellDecoder(v, f, 32, 32, dropout=0.0),
        data["vocab"], max_len=16, max_nonfinite_steps=max_nonfinite, nan_steps=nan_steps,
    )  # fmt: skip
    datamodule = CaptionDataModule(
        train_shards=data["train_shards"], val_shards=data["val_shards"], vocab=data["vocab"],
        global_batch_size=16, num_workers=0, max_len=16,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, accelerator="cpu", logger=False, enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts")], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_nonfinite_steps_are_skipped_and_counted(synthetic_data, tmp_path):
    module, trainer = run(synthetic_data, tmp_path, nan_steps={2}, max_nonfinite=5, steps=5)
    assert module.nonfinite_steps == 1 and trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_run_of_nonfinite_steps_stops_with_a_checkpoint_and_advice(synthetic_data, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="capline.module"):
        module, trainer = run(synthetic_data, tmp_path, nan_steps=set(range(3, 100)), max_nonfinite=3, steps=50)
    assert module.nonfinite_steps == 3 and trainer.global_step < 50
    saved = list((tmp_path / "ckpts").glob("nonfinite-step*.ckpt"))
    assert len(saved) == 1
    state = torch.load(saved[0], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "learning rate" in message and str(saved[0]) in message


def test_secrets_are_redacted_from_logged_configs():
    config = {"trainer": {"logger": {"init_args": {"api_key": "abc", "project": "p"}}}, "x": [{"token": "t"}]}
    cleaned = redact(config)
    assert cleaned["trainer"]["logger"]["init_args"] == {"api_key": "<redacted>", "project": "p"}
    assert cleaned["x"] == [{"token": "<redacted>"}]
