"""`CaptionModule`: the thin LightningModule around a timm encoder and an LSTM decoder."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from capline.data.decode import SKIP_REASONS
from capline.metrics import CaptionMetrics
from capline.models import CaptionDecoder, TimmEncoder, beam_search, greedy_search
from capline.models.loss import masked_cross_entropy
from capline.schedules import EncoderFinetuning, LRSchedule, ScheduledSampling
from capline.vocab import Vocabulary

log = logging.getLogger(__name__)

DecoderFactory = Callable[[int, int], CaptionDecoder]


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=4e-4, weight_decay=0.0)


class CaptionModule(L.LightningModule):
    """Trains and evaluates an image captioner.

    Args:
        encoder: The timm CNN.
        decoder: The decoder class and its settings; vocabulary size and feature size are filled in.
        vocabulary: The vocabulary: a `vocab.json` path (filled in from `data.vocab` by the CLI) or its word list.
        optimizer: Optimizer for all trainable parameters; its `lr` is the decoder's, per global batch.
        lr_schedule: Learning-rate multiplier over training steps.
        encoder_finetuning: When the encoder starts training, and at which rate.
        scheduled_sampling: Scheduled-sampling probability over training.
        max_len: Most words generated per caption.
        val_beam_size: Beam size for validation (1 = greedy).
        test_beam_size: Beam size for `capline test` and `predict`.
        length_penalty: Beam search length-normalisation exponent.
    """

    def __init__(
        self,
        encoder: TimmEncoder,
        decoder: DecoderFactory,
        vocabulary: str | list[str],
        optimizer: OptimizerCallable = default_optimizer,
        lr_schedule: LRSchedule | None = None,
        encoder_finetuning: EncoderFinetuning | None = None,
        scheduled_sampling: ScheduledSampling | None = None,
        max_len: int = 20,
        val_beam_size: int = 1,
        test_beam_size: int = 3,
        length_penalty: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        self.vocab = Vocabulary.load(vocabulary) if isinstance(vocabulary, str) else Vocabulary(vocabulary)
        self.encoder = encoder
        self.decoder = decoder(len(self.vocab), encoder.num_features)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or LRSchedule()
        self.finetuning = encoder_finetuning or EncoderFinetuning()
        self.sampling = scheduled_sampling or ScheduledSampling()
        self.max_len, self.length_penalty = max_len, length_penalty
        self.beam_sizes = {"val": val_beam_size, "test": test_beam_size, "predict": test_beam_size}
        self.caption_metrics = nn.ModuleDict({s: CaptionMetrics(max_len=max_len) for s in ("val", "test")})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        # A plain tensor, not a buffer: DDP would overwrite every rank's counts with rank 0's.
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    # ---- the forward passes -------------------------------------------------------------------------------
    def encoder_trainable(self) -> bool:
        return self.finetuning.trainable(self.global_step)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features; while the encoder is frozen, without autograd and with BatchNorm in eval mode."""
        if self.training and self.encoder_trainable():
            self.encoder.train()
            return self.encoder(images)
        self.encoder.eval()
        with torch.no_grad():
            return self.encoder(images)

    def generate(self, images: torch.Tensor, beam_size: int = 1):
        features = self.encoder(images)
        if beam_size == 1:
            return greedy_search(self.decoder, features, self.max_len)
        return beam_search(self.decoder, features, beam_size, self.max_len, self.length_penalty)

    # ---- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._count_skips(batch["skipped"])
        tokens = batch["tokens"]  # (B, T): <start> w1 ... wn <end> <pad>...
        features = self.encode(batch["images"])
        ss_prob = self.sampling.prob(self.global_step, self.current_epoch)
        logits = self.decoder.forward_scheduled(features, tokens[:, :-1], ss_prob, self.sampling.sample)
        loss = masked_cross_entropy(logits, tokens[:, 1:])
        groups = self.optimizers().param_groups
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/lr": groups[0]["lr"],
                "train/lr_encoder": next((g["lr"] for g in groups if g.get("name") == "encoder"), 0.0),
                "train/ss_prob": ss_prob,
                "train/encoder_trainable": float(self.encoder_trainable()),
            }
        )
        return loss

    def _count_skips(self, skipped: torch.Tensor) -> None:
        new = skipped.cpu()
        for reason, before, added in zip(SKIP_REASONS, self.skipped.tolist(), new.tolist()):
            if added and not before:
                log.warning("skipping bad samples: %s (counted as data/skipped/%s)", reason, reason)
        self.skipped += new

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        totals = self.trainer.strategy.reduce(self.skipped.float().to(self.device), reduce_op="sum")  # all ranks
        self.log("data/skipped", totals.sum(), rank_zero_only=True)
        self.log_dict({f"data/skipped/{r}": n for r, n in zip(SKIP_REASONS, totals)}, rank_zero_only=True)

    # ---- evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> dict | None:
        if batch["images"].shape[0] == 0:
            return None
        tokens = batch["tokens"]
        features = self.encoder(batch["images"])
        loss = masked_cross_entropy(self.decoder(features, tokens[:, :-1]), tokens[:, 1:])
        self.eval_loss[stage].update(loss, weight=tokens.shape[0])
        beam = self.beam_sizes[stage]
        if beam == 1:
            generation = greedy_search(self.decoder, features, self.max_len)
        else:
            generation = beam_search(self.decoder, features, beam, self.max_len, self.length_penalty)
        self.caption_metrics[stage].update(generation.tokens, batch["refs"], batch["image_ids"])
        return {"tokens": generation.tokens}

    def validation_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.caption_metrics["val"].reset()
        self.eval_loss["val"].reset()

    def on_test_epoch_start(self) -> None:
        self.caption_metrics["test"].reset()
        self.eval_loss["test"].reset()

    def _log_eval(self, stage: str) -> dict:
        # compute() gathers every rank's state once, at the end: no per-step collective can deadlock.
        results = {f"{stage}/{k}": v.float() for k, v in self.caption_metrics[stage].compute().items()}
        results[f"{stage}/loss"] = self.eval_loss[stage].compute()
        cider = results.pop(f"{stage}/cider")
        self.log_dict(results)
        self.log(f"{stage}/cider", cider, prog_bar=True)
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        generation = self.generate(batch["images"], self.beam_sizes["predict"])
        captions = [self.vocab.decode(row) for row in generation.tokens.tolist()]
        return [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_ids"].tolist(), captions)]

    # ---- optimisation -----------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        def split(module: nn.Module, prefix: str, extra: dict) -> list[dict]:
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            no_decay = [p for n, p in params if p.ndim <= 1]  # norms and biases get no weight decay
            decay = [p for n, p in params if p.ndim > 1]
            return [
                {"params": decay, "name": prefix, **extra},
                {"params": no_decay, "name": f"{prefix}_no_decay", "weight_decay": 0.0, **extra},
            ]

        groups = split(self.decoder, "decoder", {})
        if self.finetuning.freeze_steps >= 0:
            groups += split(self.encoder, "encoder", {"lr": self.finetuning.lr})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._param_groups())
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def lr_lambda(encoder: bool) -> Callable[[int], float]:
            if encoder:
                return lambda step: self.finetuning.factor(step) * self.lr_schedule.factor(step, total)
            return lambda step: self.lr_schedule.factor(step, total)

        lambdas = [lr_lambda(g["name"].startswith("encoder")) for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocab"] = self.vocab.words

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        words = checkpoint.get("vocab")
        if words is not None and words != self.vocab.words:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(words)} words) differs from the configured one "
                f"({len(self.vocab)} words); use the vocab.json the checkpoint was trained with"
            )
