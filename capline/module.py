"""`CaptionModule`: the thin LightningModule around a timm encoder and an LSTM decoder."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from capline.checkpoints import check_compatible
from capline.data.decode import SKIP_REASONS
from capline.metrics import CaptionMetrics, SceneTruth
from capline.metrics.diagnostics import collapse_warning
from capline.metrics.reward import CiderReward, training_reward
from capline.models import CaptionDecoder, TimmEncoder, beam_search, greedy_search
from capline.models.feature_cache import FrozenFeatureCache
from capline.models.loss import masked_cross_entropy
from capline.models.scst import SCST, scst_loss
from capline.rng import collect_rng_states, restore_rng_states
from capline.schedules import EncoderFinetuning, LRSchedule, ScheduledSampling
from capline.vocab import Vocabulary
from capline.word_vectors import WordVectors, apply_word_vectors

log = logging.getLogger(__name__)

DecoderFactory = Callable[[int, int], CaptionDecoder]

# For values that are the same on every rank already (torchmetrics' compute() gathered them): Lightning syncs
# epoch-level values (and warns when told not to); the max of equal values is exact, where a mean could round.
ALREADY_REDUCED = {"sync_dist": True, "reduce_fx": "max"}


def _as(cls, value):
    """A schedule from its dataclass, its dict (as stored in checkpoints) or None (the defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


def _cache_keys(stage: str, batch: dict) -> list[str] | None:
    """Names of a batch's images for the feature cache: a sample's key is unique within its split only."""
    return [f"{stage}/{key}" for key in batch["keys"]] if "keys" in batch else None


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
        max_nonfinite_steps: Stop (with a checkpoint) after this many optimizer steps in a row skipped because
            the loss or the gradients were NaN/inf.
        scst: Self-critical sequence training from `scst.start_step` on (None: cross-entropy throughout).
        word_vectors: Pretrained word vectors (GloVe) that initialise the decoder's word embeddings when training
            starts, optionally frozen (see `capline.word_vectors`).
        feature_cache_gib: While `fit` runs with the encoder frozen, keep each image's features (up to this much
            memory) instead of recomputing them every epoch (see `capline.models.feature_cache`); 0 turns it off.
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
        max_nonfinite_steps: int = 20,
        scst: SCST | None = None,
        word_vectors: WordVectors | None = None,
        feature_cache_gib: float = 0.0,
    ):
        super().__init__()
        # Plain values only, so checkpoints load with weights_only=True (the parts are rebuilt from the config).
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer"])
        self.vocab = Vocabulary.load(vocabulary) if isinstance(vocabulary, str) else Vocabulary(vocabulary)
        self.encoder = encoder
        self.decoder = decoder(len(self.vocab), encoder.num_features)
        self.optimizer_factory = optimizer
        self.lr_schedule = _as(LRSchedule, lr_schedule)
        self.finetuning = _as(EncoderFinetuning, encoder_finetuning)
        if self.finetuning.freeze_steps < 0:  # never trained: no gradient, and the model summary counts it frozen
            self.encoder.requires_grad_(False)
        self.sampling = _as(ScheduledSampling, scheduled_sampling)
        self.scst = SCST(**scst) if isinstance(scst, dict) else scst
        self.word_vectors = WordVectors(**word_vectors) if isinstance(word_vectors, dict) else word_vectors
        self.feature_cache = FrozenFeatureCache(feature_cache_gib) if feature_cache_gib > 0 else None
        self.reward: CiderReward | None = None  # SCST's, with the training corpus statistics (built in setup)
        for name in ("lr_schedule", "encoder_finetuning", "scheduled_sampling", "scst", "word_vectors"):
            if dataclasses.is_dataclass(self.hparams.get(name)):
                self.hparams[name] = dataclasses.asdict(self.hparams[name])
        self.max_len, self.length_penalty = max_len, length_penalty
        self.beam_sizes = {"val": val_beam_size, "test": test_beam_size, "predict": test_beam_size}
        self.caption_metrics = nn.ModuleDict({s: CaptionMetrics(max_len=max_len) for s in ("val", "test")})
        # Is each caption true of its scene? Only for data whose samples carry the scene (the synthetic demo).
        self.scene_truth = nn.ModuleDict({s: SceneTruth(self.vocab.words) for s in ("val", "test")})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        # A plain tensor, not a buffer: DDP would overwrite every rank's counts with rank 0's.
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.empty_batches = 0  # training batches whose samples were all skipped
        self._rng_to_restore: dict | None = None
        self.run_config: dict | None = None  # the resolved CLI config, stored in every checkpoint
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps, self._nonfinite_in_a_row = 0, 0
        self._loss_finite: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        # Runs before DDP wraps the model. The encoder keeps requires_grad=True while frozen (it runs under
        # no_grad instead), so DDP registers its parameters and all-reduces their gradients once it is unfrozen;
        # DDP must then be told that some parameters get no gradient during the warm-up.
        strategy = self.trainer.strategy if self._trainer is not None else None
        frozen_in_scst = self.scst is not None and not self.scst.train_encoder
        if isinstance(strategy, DDPStrategy) and (self.finetuning.freeze_steps > 0 or frozen_in_scst):
            if not strategy._ddp_kwargs.get("find_unused_parameters"):
                log.info("encoder warm-up under DDP: setting find_unused_parameters=True")
                strategy._ddp_kwargs["find_unused_parameters"] = True
        if self.word_vectors is not None and stage == "fit":  # a resumed run then loads its trained embeddings
            rank_zero_info(apply_word_vectors(self.decoder.embed, self.vocab, self.word_vectors))
        if self.scst is not None and stage == "fit" and self.reward is None:
            self.reward = training_reward(self.trainer.datamodule)  # fails in one sentence without references

    @property
    def needs_train_references(self) -> bool:
        """Whether training batches must carry every reference (read by `CaptionDataModule`)."""
        return self.scst is not None

    # ---- the forward passes -------------------------------------------------------------------------------
    def encoder_trainable(self) -> bool:
        frozen_in_scst = self.scst_active() and not self.scst.train_encoder
        return self.finetuning.trainable(self.global_step) and not frozen_in_scst

    def scst_active(self) -> bool:
        return self.scst is not None and self.scst.active(self.global_step)

    def encode(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Encoder features; while the encoder is frozen, without autograd, with BatchNorm in eval mode, and from
        the feature cache (when there is one, during `fit`) for images it has seen."""
        if self.training and self.encoder_trainable():
            if self.feature_cache is not None:
                self.feature_cache.clear()  # the encoder changes from this step on
            self.encoder.train()
            return self.encoder(images)
        self.encoder.eval()
        with torch.no_grad():
            if self._cache_applies() and keys is not None:
                return self.feature_cache.features(keys, images, self.encoder)
            return self.encoder(images)

    def _cache_applies(self) -> bool:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return self.feature_cache is not None and fitting and not self.encoder_trainable()

    def generate(self, images: torch.Tensor, beam_size: int = 1):
        features = self.encoder(images)
        if beam_size == 1:
            return greedy_search(self.decoder, features, self.max_len)
        return beam_search(self.decoder, features, beam_size, self.max_len, self.length_penalty)

    # ---- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self._count_skips(batch["skipped"])
        if batch["images"].shape[0] == 0:  # every sample of the batch was skipped
            return self._empty_batch_step()
        tokens = batch["tokens"]  # (B, T): <start> w1 ... wn <end> <pad>...
        features = self.encode(batch["images"], _cache_keys("train", batch))
        if self.scst_active():  # the reward replaces cross-entropy; scheduled sampling does not apply
            ss_prob = 0.0
            loss, stats = scst_loss(self.decoder, features, batch["refs"], self.reward, self.scst, self.max_len)
            self.log_dict({f"train/scst_{name}": value for name, value in stats.items()})
        else:
            ss_prob = self.sampling.prob(self.global_step, self.current_epoch)
            logits = self.decoder.forward_scheduled(features, tokens[:, :-1], ss_prob, self.sampling.sample)
            loss = masked_cross_entropy(logits, tokens[:, 1:])
        self._loss_finite = torch.isfinite(loss.detach())
        groups = self.optimizers().param_groups
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/lr": groups[0]["lr"],
                "train/lr_encoder": next((g["lr"] for g in groups if g.get("name") == "encoder"), 0.0),
                "train/ss_prob": ss_prob,
                "train/encoder_trainable": float(self.encoder_trainable()),
                "train/phase": float(self.scst_active()),  # 0 cross-entropy, 1 SCST
            }
        )
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skips the step when the loss or any gradient is NaN/inf.

        Gradients are already all-reduced here, so every DDP rank takes the same decision without a collective.
        With `16-mixed`, inf gradients are the GradScaler's business (it skips and lowers the scale itself).
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        if grads and self.trainer.precision != "16-mixed":
            # One fused norm pass: a norm is NaN/inf when any element is (or when a finite gradient overflows it).
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().cpu()
        if bool(finite):
            self._nonfinite_in_a_row = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no moment change
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        log.warning("step %d: non-finite loss or gradients, optimizer step skipped", self.global_step)
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            self._stop_on_nonfinite()

    def _stop_on_nonfinite(self) -> None:
        callback = self.trainer.checkpoint_callback
        folder = callback.dirpath if callback is not None and callback.dirpath else self.trainer.default_root_dir
        path = f"{folder}/nonfinite-step{self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)
        log.error(
            "stopping: %d optimizer steps in a row had a NaN/inf loss or gradients. The weights before them are in %s. "
            "Look at the learning rate (too high?), trainer.gradient_clip_val, 16-mixed without enough loss "
            "scaling (try bf16-mixed), and the data of the last batches (data/skipped).",
            self._nonfinite_in_a_row, path,
        )  # fmt: skip
        self.trainer.should_stop = True

    def _empty_batch_step(self) -> torch.Tensor | None:
        """A batch without one usable sample: counted, and no step is taken on it.

        Alone, the step is skipped (Lightning skips the optimizer step of a `None` loss). Under DDP every rank
        must join the gradient all-reduce, so this rank contributes zero gradients to the others' step instead.
        """
        self.empty_batches += 1
        self.log("data/empty_batches", float(self.empty_batches))
        if self.empty_batches == 1:
            log.warning("step %d: all samples of a batch were skipped (see data/empty_batches)", self.global_step)
        self._loss_finite = None
        if self.trainer.world_size == 1:
            return None
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

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
        # This rank's counts; Lightning sums them over the ranks.
        counts = self.skipped.float().to(self.device)
        self.log("data/skipped", counts.sum(), sync_dist=True, reduce_fx="sum")
        self.log_dict({f"data/skipped/{r}": n for r, n in zip(SKIP_REASONS, counts)}, sync_dist=True, reduce_fx="sum")

    # ---- evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> dict | None:
        if batch["images"].shape[0] == 0:
            return None
        tokens = batch["tokens"]
        features = self.encode(batch["images"], _cache_keys(stage, batch))
        loss = masked_cross_entropy(self.decoder(features, tokens[:, :-1]), tokens[:, 1:])
        self.eval_loss[stage].update(loss, weight=tokens.shape[0])
        beam = self.beam_sizes[stage]
        if beam == 1:
            generation = greedy_search(self.decoder, features, self.max_len)
        else:
            generation = beam_search(self.decoder, features, beam, self.max_len, self.length_penalty)
        self.caption_metrics[stage].update(generation.tokens, batch["refs"], batch["image_ids"])
        if "scenes" in batch:
            self.scene_truth[stage].update(
                generation.tokens, batch["scenes"], batch["image_ids"], generation.alphas, batch["scene_boxes"],
                tuple(features.shape[-2:]),
            )  # fmt: skip
        return {"tokens": generation.tokens}

    def validation_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        return self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.caption_metrics["val"].reset()
        self.scene_truth["val"].reset()
        self.eval_loss["val"].reset()

    def on_test_epoch_start(self) -> None:
        self.caption_metrics["test"].reset()
        self.scene_truth["test"].reset()
        self.eval_loss["test"].reset()

    def _log_eval(self, stage: str) -> dict:
        # compute() gathers every rank's state once, at the end: no per-step collective can deadlock.
        results = {f"{stage}/{k}": v.float() for k, v in self.caption_metrics[stage].compute().items()}
        results[f"{stage}/loss"] = self.eval_loss[stage].compute()
        cider = results.pop(f"{stage}/cider")
        self.log_dict(results, **ALREADY_REDUCED)
        self.log(f"{stage}/cider", cider, prog_bar=True, **ALREADY_REDUCED)
        if int(results[f"{stage}/num_images"]) == 0:
            if self.trainer.is_global_zero and not self.trainer.sanity_checking:
                log.warning("%s at step %d: no image could be read, nothing was scored (see data/skipped)",
                            stage, self.global_step)  # fmt: skip
            return results
        warning = collapse_warning(
            float(cider), float(results[f"{stage}/cider_shuffled"]), float(results[f"{stage}/unique_captions"]),
            int(results[f"{stage}/num_images"]),
        )  # fmt: skip
        if warning and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.warning("%s at step %d: %s", stage, self.global_step, warning)
        return results

    def _log_scene_truth(self, stage: str) -> None:
        # Every rank takes the same decision (a sum over ranks), so compute's collective runs on all or none.
        metric = self.scene_truth[stage]
        updates = torch.tensor(float(metric.update_count), device=self.device)
        if float(self.trainer.strategy.reduce(updates, reduce_op="sum")) == 0:
            return  # data without scene attributes
        results = metric.compute()
        results.pop("num_scenes")
        self.log_dict({f"{stage}/{name}": value.float() for name, value in results.items()}, **ALREADY_REDUCED)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        self._log_scene_truth("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
        self._log_scene_truth("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        if batch["images"].shape[0] == 0:
            return []  # every image of the batch was unreadable
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
        if self.scst is not None:  # the schedule spans cross-entropy; SCST runs at its own constant rate
            total = max(1, min(total, self.scst.start_step))
        scst_factor = self.scst.lr / optimizer.param_groups[0]["lr"] if self.scst is not None else 1.0

        def lr_lambda(encoder: bool) -> Callable[[int], float]:
            def factor(step: int) -> float:
                scst = self.scst is not None and self.scst.active(step)
                rate = scst_factor if scst else self.lr_schedule.factor(step, total)
                return rate * (self.finetuning.factor(step) if encoder else 1.0)

            return factor

        lambdas = [lr_lambda(g["name"].startswith("encoder")) for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocab"] = self.vocab.words
        checkpoint["rng_states"] = collect_rng_states()
        if self.reward is not None:
            checkpoint["scst_reward"] = self.reward.state_dict()  # a resumed run scores with the same statistics
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version  # the run a resumed job continues

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored at the first step after resuming, not at load time: building loaders in between must not
        # shift the random streams (dropout, scheduled sampling) of a resumed run.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.feature_cache is not None:
            self.feature_cache.clear()
        self._rng_to_restore = checkpoint.get("rng_states")
        if self.scst is not None and "scst_reward" in checkpoint:
            self.reward = CiderReward.from_state_dict(checkpoint["scst_reward"])
        check_compatible(checkpoint, self.vocab, self.state_dict())
