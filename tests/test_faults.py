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


def test_every_way_fit_ends_leaves_last_ckpt_at_that_step(synthetic_data, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from capline.callbacks import CaptionCheckpoint

    def fit(folder, nan_steps=(), max_nonfinite=20, steps=7, **trainer_kwargs):
        torch.manual_seed(0)
        module = PoisonedModule(
            TimmEncoder("resnet18", img_size=64, crop_pct=1.0), lambda v, f: ShowTellDecoder(v, f, 32, 32),
            synthetic_data["vocab"], max_len=16, max_nonfinite_steps=max_nonfinite, nan_steps=set(nan_steps),
        )  # fmt: skip
        datamodule = CaptionDataModule(
            train_shards=synthetic_data["train_shards"], val_shards=synthetic_data["val_shards"],
            vocab=synthetic_data["vocab"], global_batch_size=16, num_workers=0, max_len=16,
        )  # fmt: skip
        checkpoint = CaptionCheckpoint(dirpath=tmp_path / folder, monitor="val/cider", mode="max", save_last=True)
        callbacks = [checkpoint, *trainer_kwargs.pop("callbacks", [])]
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
            callbacks=callbacks, default_root_dir=tmp_path, enable_model_summary=False, **trainer_kwargs,
        )  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        saved = torch.load(tmp_path / folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        return trainer.global_step, saved

    # max_steps not a multiple of the validation interval: Lightning alone keeps last.ckpt at step 4
    assert fit("max_steps", steps=7, val_check_interval=4, limit_val_batches=1) == (7, 7)
    # max_epochs 3 (epochs of 3 batches here), validating every second epoch: Lightning alone stops at step 6
    assert fit("max_epochs", steps=-1, max_epochs=3, limit_train_batches=3, limit_val_batches=1,
               check_val_every_n_epoch=2) == (9, 9)  # fmt: skip
    # the non-finite guard stops after the third NaN step in a row (steps 3, 4 and 5; the skipped steps count)
    assert fit("nonfinite", nan_steps=range(3, 100), max_nonfinite=3, steps=50, limit_val_batches=0) == (6, 6)
    # early stopping on val/cider after a first validation at step 2, stopped at step 4
    stop = EarlyStopping(monitor="val/cider", mode="max", patience=0, check_finite=False, stopping_threshold=-1.0)
    got = fit("early", steps=50, val_check_interval=2, limit_val_batches=1, callbacks=[stop])
    assert got[0] < 50 and got[0] == got[1]
