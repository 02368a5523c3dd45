"""Lightning overhead: the demo model trained by `Trainer.fit` + `CaptionModule` against a bare PyTorch loop.

    python -m tools.benchmarks.overhead            # 80 timed steps of each
    python -m tools.benchmarks.overhead --quick    # 30

Both sides train the demo model (resnet18 at 64 px trained from the first step, ShowTellDecoder 256/256, AdamW,
fp32, gradient norm clipped at 5, cosine LR schedule) on the same in-memory batches, served by the same
`DataLoader` over a list, so data loading costs nothing and is the same on both sides. Lightning runs with no
logger, no checkpointing, no validation and no progress bar. The two alternate step by step (the bare step runs
from a callback after each Lightning step, and its time is taken out of the Lightning step's), so a burst of load
on a shared machine hits both alike. The first `WARMUP_STEPS` are not timed; the value is the median over steps
of (bare step time / the Lightning step just before it), and images/s are from median step times. The module's own
per-step work (skip counting, `self.log`, the non-finite gradient check) counts as Lightning's.
"""

from __future__ import annotations

import functools
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from capline.data.decode import SKIP_REASONS
from capline.data.synthetic import generate_scene
from capline.models import ShowTellDecoder, TimmEncoder
from capline.models.loss import masked_cross_entropy
from capline.module import CaptionModule
from capline.schedules import EncoderFinetuning, LRSchedule
from capline.vocab import Vocabulary
from tools.benchmarks import main
from tools.benchmarks import row as _row

# The demo model of configs/demo.yaml, pinned here so that the figures keep their meaning when the config changes.
DEMO_ENCODER = {"model_name": "resnet18", "pretrained": False, "img_size": 64, "crop_pct": 1.0}
DEMO_DECODER = {"embed_dim": 256, "hidden_dim": 256, "num_layers": 1, "dropout": 0.1}
DEMO_OPTIMIZER = {"lr": 0.002, "weight_decay": 0.0}
DEMO_TRAINER = {"precision": "32-true", "gradient_clip_val": 5.0}
DEMO_MAX_LEN = 16
BATCH_SIZE = 64  # the demo's global batch
CAPTION_WORDS = 12  # + <start> and <end>: 14 tokens, as the demo's scenes
WARMUP_STEPS = 5


# ---- the demo model and its batches (shared with sampling.py) -------------------------------------------------
def demo_vocabulary(num_scenes: int = 300) -> Vocabulary:
    """The demo's words: those of the captions of the first synthetic scenes (drawn small, only words count)."""
    return Vocabulary.build((c for i in range(num_scenes) for c in generate_scene(i, image_size=32)[1]), min_count=1)


def demo_module(vocab: Vocabulary, seed: int = 0, decoder: type = ShowTellDecoder, **decoder_args) -> CaptionModule:
    """The demo's `CaptionModule`; `decoder` and `decoder_args` replace its decoder."""
    torch.manual_seed(seed)
    return CaptionModule(
        encoder=TimmEncoder(**DEMO_ENCODER),
        decoder=functools.partial(decoder, **(decoder_args or DEMO_DECODER)),
        vocabulary=vocab.words,
        optimizer=functools.partial(torch.optim.AdamW, **DEMO_OPTIMIZER),
        lr_schedule=LRSchedule(name="cosine", warmup_steps=30, min_ratio=0.05),
        encoder_finetuning=EncoderFinetuning(freeze_steps=0, lr=DEMO_OPTIMIZER["lr"]),
        max_len=DEMO_MAX_LEN,
    )


def make_batches(
    vocab_size: int,
    num: int,
    batch_size: int = BATCH_SIZE,
    words: int = CAPTION_WORDS,
    image_size: int = DEMO_ENCODER["img_size"],
    seed: int = 0,
) -> list[dict]:
    """Training batches as `CaptionBatcher` yields them: uint8 images, `<start> words <end>` tokens padded with 0
    (captions of `words - 3` to `words` words), no skipped samples."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        lengths = torch.randint(words - 3, words + 1, (batch_size,), generator=gen)
        lengths[0] = words
        tokens = torch.zeros(batch_size, words + 2, dtype=torch.long)  # (B, T)
        for row, n in enumerate(lengths.tolist()):
            tokens[row, 0] = Vocabulary.start_id
            tokens[row, 1 : n + 1] = torch.randint(4, vocab_size, (n,), generator=gen)
            tokens[row, n + 1] = Vocabulary.end_id
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
        batches.append({
            "images": images, "tokens": tokens, "image_ids": torch.arange(batch_size),
            "keys": [str(i) for i in range(batch_size)], "skipped": torch.zeros(len(SKIP_REASONS), dtype=torch.long),
        })  # fmt: skip
    return batches


class _Repeated(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


def batch_loader(batches: list[dict], steps: int) -> DataLoader:
    """`steps` batches cycling through `batches`, in the main process (`batch_size=None`: they are batches)."""
    return DataLoader(_Repeated(batches, steps), batch_size=None, shuffle=False, num_workers=0)


# ---- the two training loops ---------------------------------------------------------------------------------
class BareLoop:
    """A hand-written training step doing the same work as `CaptionModule` under Lightning: forward, loss,
    backward, gradient clipping, the optimizer and LR schedule of the config, in the same precision."""

    def __init__(self, module: CaptionModule, precision: str, clip: float | None, total_steps: int):
        self.module, self.clip = module, clip
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = module.optimizer_factory(self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: module.lr_schedule.factor(step, total_steps)
        )
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        module.train()

    def step(self, batch: dict) -> None:
        tokens = batch["tokens"]  # (B, T)
        with self.autocast:
            logits = self.module.decoder(self.module.encoder(batch["images"]), tokens[:, :-1])  # (B, T-1, V)
            loss = masked_cross_entropy(logits, tokens[:, 1:])
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()


class StepTimer(L.Callback):
    """Records when each training step starts, and when training ends.

    With `between`, runs it after every Lightning step and records how long it took, so that the two loops
    alternate step by step and see the same load on a shared machine.
    """

    def __init__(self, between=None):
        self.between = between
        self.stamps: list[float] = []
        self.between_s: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.between is not None:
            start = time.perf_counter()
            self.between(batch)
            self.between_s.append(time.perf_counter() - start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())


def interleaved_step_times(steps: int) -> dict[str, list[float]]:
    """Seconds per step of `Trainer.fit` and of `BareLoop`, alternating step by step, warm-up excluded."""
    vocab = demo_vocabulary()
    loader = batch_loader(make_batches(len(vocab), num=4), steps)
    bare = BareLoop(demo_module(vocab), DEMO_TRAINER["precision"], DEMO_TRAINER["gradient_clip_val"], steps)
    timer = StepTimer(between=bare.step)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer], **DEMO_TRAINER,
    )  # fmt: skip
    trainer.fit(demo_module(vocab), train_dataloaders=loader)
    spans = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]  # Lightning step + the bare step after it
    return {
        "lightning": [span - between for span, between in zip(spans, timer.between_s)][WARMUP_STEPS:],
        "bare": timer.between_s[WARMUP_STEPS:],
    }


def run(quick: bool = False, timed_steps: int | None = None) -> list[dict]:
    """Median over steps of bare step time / the Lightning step just before it (the fraction of speed kept)."""
    times = interleaved_step_times(WARMUP_STEPS + (timed_steps or (30 if quick else 80)))
    ratio = statistics.median(b / lit for b, lit in zip(times["bare"], times["lightning"]))
    return [
        _row("lightning_vs_bare_loop_demo", ratio, 0.95, ratio >= 0.95),
        _row("lightning_demo_train_img_s", BATCH_SIZE / statistics.median(times["lightning"])),
        _row("bare_loop_demo_train_img_s", BATCH_SIZE / statistics.median(times["bare"])),
    ]


if __name__ == "__main__":
    main(__doc__, run, "30 timed steps instead of 80")
