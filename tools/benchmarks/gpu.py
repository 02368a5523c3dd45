"""GPU throughput: resnet50 at 224 px + ShowTellDecoder(512), bf16-mixed, channels_last, fused AdamW, real data.

    python -m tools.benchmarks.gpu            # 40 timed steps of 256 images per setting
    python -m tools.benchmarks.gpu --quick    # 20

Only on a machine with CUDA (elsewhere the rows say "not measured"). `Trainer.fit` trains `CaptionModule` on one
GPU from `CaptionDataModule` reading the COCO-like shards of `tools/benchmarks/data.py` (pre-resized to 256 px, as
`capline shards --max-size 256` writes them, and as they are), with a 10,000-word vocabulary. Reported per
setting: images/s per GPU at steady state, and the fraction of that wall time the training loop spent blocked
in the dataloader's `next()`. The settings: encoder trained, and encoder frozen (no gradient, BatchNorm in eval).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from capline.data.datamodule import CaptionDataModule
from capline.models import ShowTellDecoder, TimmEncoder
from capline.module import CaptionModule
from capline.schedules import EncoderFinetuning, LRSchedule
from capline.vocab import SPECIAL_TOKENS, Vocabulary
from tools.benchmarks import data as data_bench
from tools.benchmarks import main
from tools.benchmarks.overhead import StepTimer

VOCAB_SIZE = 10_000  # COCO's, words seen 5+ times
BATCH_SIZE = 256
WARMUP_STEPS = 10
NOT_MEASURED = "no CUDA device on this machine"


class _WaitTimer:
    """Iterates `loader`, adding up the seconds each `next()` blocked the training loop."""

    def __init__(self, loader, waits: list[float]):
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


class _TimedData(CaptionDataModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []

    def train_dataloader(self):
        return _WaitTimer(super().train_dataloader(), self.waits)


def coco_sized_vocab(folder: Path) -> str:
    """A `vocab.json` holding the shards' caption words, padded with unused words to `VOCAB_SIZE`."""
    words = list(dict.fromkeys(data_bench.WORDS))
    filler = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - len(words))]
    path = folder / f"vocab{VOCAB_SIZE}.json"
    Vocabulary([*SPECIAL_TOKENS, *words, *filler]).save(path)
    return str(path)


def measure(
    shards: str,
    vocab: str,
    *,
    frozen: bool,
    steps: int,
    accelerator: str = "gpu",
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    model_name: str = "resnet50",
    img_size: int | None = None,
    precision: str = "bf16-mixed",
) -> tuple[float, float]:
    """Returns (images/s, fraction of wall time waiting for data) over steady-state training steps."""
    workers = workers if workers is not None else max(1, (os.cpu_count() or 2) - 2)
    module = CaptionModule(
        encoder=TimmEncoder(model_name, img_size=img_size, channels_last=True),
        decoder=functools.partial(ShowTellDecoder, embed_dim=512, hidden_dim=512),
        vocabulary=vocab,
        optimizer=functools.partial(torch.optim.AdamW, lr=4e-4, weight_decay=0.0, fused=True),
        lr_schedule=LRSchedule(name="constant"),
        encoder_finetuning=EncoderFinetuning(freeze_steps=-1 if frozen else 0, lr=1e-5),
    )
    data = _TimedData(
        train_shards=shards,
        vocab=vocab,
        global_batch_size=batch_size,
        num_workers=workers,
        samples_per_epoch=steps * batch_size,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps, benchmark=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    wall = timer.stamps[-1] - timer.stamps[WARMUP_STEPS]
    timed_steps = len(timer.stamps) - 1 - WARMUP_STEPS
    # Lightning fetches one batch ahead: the wait for batch i+1 happens while step i runs.
    waiting = sum(data.waits[WARMUP_STEPS + 1 :])
    return timed_steps * batch_size / wall, waiting / wall


def not_measured(note: str = NOT_MEASURED) -> list[dict]:
    return [{"name": name, "value": None, "goal": "report", "ok": None, "note": note} for name in _row_names()]


SETTINGS = [(setting, split) for setting in ("encoder_trained", "encoder_frozen") for split in ("pre256", "raw")]


def _row_names() -> list[str]:
    return [f"gpu_{what}_{setting}_{split}" for setting, split in SETTINGS for what in ("img_s", "data_wait_fraction")]


def run(quick: bool = False) -> list[dict]:
    """Images/s per GPU and data-wait fraction, encoder trained and frozen, pre-resized and raw shards."""
    if not torch.cuda.is_available():
        return not_measured()
    info = data_bench.prepare_shards(1500)
    vocab = coco_sized_vocab(Path(tempfile.mkdtemp(prefix="capline-bench-gpu-")))
    steps = WARMUP_STEPS + (20 if quick else 40)
    rows = []
    note = f"{torch.cuda.get_device_name()}, batch {BATCH_SIZE}"
    for setting, split in SETTINGS:
        img_s, wait = measure(info[split]["pattern"], vocab, frozen=setting == "encoder_frozen", steps=steps)
        for what, value in (("img_s", img_s), ("data_wait_fraction", wait)):
            rows.append(
                {"name": f"gpu_{what}_{setting}_{split}", "value": value, "goal": "report", "ok": True, "note": note}
            )
    return rows


if __name__ == "__main__":
    main(__doc__, run, "20 timed steps per setting")
