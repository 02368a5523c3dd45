"""The training recipe: frozen-then-fine-tuned encoder, scheduled sampling, mixed precision, optimizer groups."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from capline.data.datamodule import CaptionDataModule
from capline.models import ShowTellDecoder, TimmEncoder
from capline.module import CaptionModule
from capline.schedules import EncoderFinetuning, LRSchedule, ScheduledSampling


def make_module(vocab: str, freeze_steps: int, **kwargs) -> CaptionModule:
    torch.manual_seed(0)
    return CaptionModule(
        TimmEncoder("resnet18", img_size=64, crop_pct=1.0),
        lambda v, f: ShowTellDecoder(v, f, 32, 32, dropout=0.0),
        vocab,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        encoder_finetuning=EncoderFinetuning(freeze_steps=freeze_steps, lr=1e-3, warmup_steps=2),
        max_len=16,
        **kwargs,
    )


def fit(module: CaptionModule, data: dict, steps: int, tmp_path, precision="32-true", callbacks=()) -> L.Trainer:
    datamodule = CaptionDataModule(
        train_shards=data["train_shards"], val_shards=data["val_shards"], vocab=data["vocab"],
        global_batch_size=16, num_workers=0, max_len=16,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, accelerator="cpu", precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


class EncoderWatch(L.Callback):
    """Records, at each step, whether any encoder gradient exists and the encoder state."""

    def __init__(self):
        self.grad_seen, self.states = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad_seen.append(any(p.grad is not None for p in pl_module.encoder.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in pl_module.encoder.state_dict().items()})


def test_frozen_encoder_is_bitwise_unchanged_then_trains_after_the_warmup(synthetic_data, tmp_path):
    module = make_module(synthetic_data["vocab"], freeze_steps=3)
    initial = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    watch = EncoderWatch()
    fit(module, synthetic_data, steps=6, tmp_path=tmp_path, callbacks=[watch])
    assert watch.grad_seen == [False, False, False, True, True, True]  # no backward through the CNN while frozen
    for step in range(3):  # weights and BatchNorm running statistics untouched
        assert all(torch.equal(watch.states[step][k], initial[k]) for k in initial), step
    changed = [k for k in initial if not torch.equal(watch.states[-1][k], initial[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("conv1.weight") for k in changed)


def test_param_groups_exclude_norms_and_biases_from_weight_decay(synthetic_data):
    module = make_module(synthetic_data["vocab"], freeze_steps=3)
    groups = {g["name"]: g for g in module._param_groups()}
    assert set(groups) == {"decoder", "decoder_no_decay", "encoder", "encoder_no_decay"}
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["decoder_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups["encoder_no_decay"]["params"])
    assert all(p.ndim > 1 for p in groups["encoder"]["params"])
    assert groups["encoder"]["lr"] == 1e-3


def test_encoder_learning_rate_is_zero_while_frozen_then_ramps():
    finetune = EncoderFinetuning(freeze_steps=10, lr=1e-4, warmup_steps=4)
    assert [finetune.factor(s) for s in (0, 9, 10, 11, 13, 20)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert not finetune.trainable(9) and finetune.trainable(10)
    assert not EncoderFinetuning(freeze_steps=-1).trainable(10**6)


@pytest.mark.parametrize("step", [0, 5, 100, 1000, 10_000])
def test_scheduled_sampling_schedules_follow_their_formulas(step):
    start, cap = 50, 0.6
    t = step - start
    linear = ScheduledSampling("linear", max_prob=cap, start_step=start, slope=1e-3)
    exponential = ScheduledSampling("exponential", max_prob=cap, start_step=start, k=0.999)
    inverse = ScheduledSampling("inverse_sigmoid", max_prob=cap, start_step=start, k=200.0)
    if t < 0:
        assert linear.prob(step) == exponential.prob(step) == inverse.prob(step) == 0.0
        return
    assert linear.prob(step) == pytest.approx(min(cap, 1e-3 * t))
    assert exponential.prob(step) == pytest.approx(min(cap, 1 - 0.999**t))
    assert inverse.prob(step) == pytest.approx(min(cap, 1 - 200 / (200 + math.exp(t / 200))))


def test_stepped_schedule_of_self_critical():
    stepped = ScheduledSampling("step", max_prob=0.25, start_epoch=2, increase_every=5, increase_by=0.05)
    probs = [stepped.prob(step=0, epoch=e) for e in (0, 1, 2, 6, 7, 12, 17, 22, 27, 100)]
    assert probs == pytest.approx([0, 0, 0, 0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.25])


def test_lr_schedules():
    cosine = LRSchedule("cosine", warmup_steps=10, min_ratio=0.1)
    assert cosine.factor(0, 110) == pytest.approx(0.1) and cosine.factor(9, 110) == pytest.approx(1.0)
    assert cosine.factor(60, 110) == pytest.approx(0.55) and cosine.factor(110, 110) == pytest.approx(0.1)
    step = LRSchedule("step", decay_rate=0.5, decay_steps=100)
    assert [step.factor(s, 1000) for s in (0, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]


def test_scheduled_sampling_is_logged_and_used_in_training(synthetic_data, tmp_path):
    module = make_module(synthetic_data["vocab"], freeze_steps=0,
                         scheduled_sampling=ScheduledSampling("linear", max_prob=0.5, slope=0.1))  # fmt: skip
    trainer = fit(module, synthetic_data, steps=4, tmp_path=tmp_path)
    assert float(trainer.callback_metrics["train/ss_prob"]) == pytest.approx(0.3)  # step 3: 0.1 * 3


def test_bf16_mixed_on_cpu_gives_finite_losses(synthetic_data, tmp_path):
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module = make_module(synthetic_data["vocab"], freeze_steps=2,
                         scheduled_sampling=ScheduledSampling("linear", max_prob=0.5, slope=0.2))  # fmt: skip
    fit(module, synthetic_data, steps=5, tmp_path=tmp_path, precision="bf16-mixed", callbacks=[Losses()])
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert module.nonfinite_steps == 0
