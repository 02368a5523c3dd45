"""`CaptionDataModule`: WebDataset caption shards in, uint8 image batches and token ids out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from capline.data import http as http_reading
from capline.data.buffers import RecyclingDataLoader
from capline.data.collate import CaptionBatcher, ImageTransform
from capline.data.counting import shard_counts
from capline.data.elastic import ElasticOrder, even_counts
from capline.data.groups import merge_image_samples
from capline.data.http import HTTPOptions
from capline.data.images import ImageFileStream, NoImagesError, find_image_files
from capline.data.layouts import FORMATS, LayoutReader
from capline.data.pipeline import EvalStream, TrainStream
from capline.data.shardlist import DataConfigError, expand_shards
from capline.data.usable import NoUsableDataError, check_usable, detect_shard_layout
from capline.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class SyntheticData:
    """The embedded demo dataset, generated on first use (see `capline.data.synthetic`)."""

    root: str = "data/synthetic"  # where the shards and vocab.json are written
    num_train: int = 8000  # training images
    num_val: int = 500  # validation images
    image_size: int = 64  # pixels per side
    seed: int = 0  # scenes are a function of (seed, index)


class CaptionDataModule(L.LightningDataModule):
    """Streams caption shards to every rank.

    Args:
        train_shards: Training shards: a brace pattern (`data/train-{000000..000099}.tar`), local or any URL
            webdataset opens, or a list.
        val_shards: Validation shards; every image is scored exactly once across all ranks.
        test_shards: Test shards, read like validation (and by `capline predict` without `predict_images`).
        predict_images: `capline predict` captions these image files instead of the test shards: a folder (its
            JPEG, PNG and WebP files) or a glob (`photos/**/*.jpg`); every file once across all ranks.
        vocab: The `vocab.json` written by `capline shards`.
        synthetic: Generate the embedded demo dataset on first use and read it (overrides the paths above).
        global_batch_size: Images per optimizer step over all devices; each device gets global / world size.
        eval_batch_size: Images per device per evaluation batch (default: the per-device training batch).
        num_workers: Dataloader worker processes per device.
        samples_per_epoch: Training samples per epoch over all ranks (default: counted from the shard index,
            img2dataset's `*_stats.json` or the tar headers; needed for remote shards only).
        max_len: Most words per caption; longer captions are truncated.
        max_refs: Most reference captions per image used for scoring.
        shuffle_buffer: Samples shuffled together over a global batch's lanes: each lane shuffles blocks of
            shuffle_buffer / global_batch_size consecutive samples (see `capline.data.elastic`).
        seed: Seed of the data order (with the epoch and the global batch size; not the ranks or workers).
        format: The shards' layout: `auto` (detected from each split's first samples, and logged), `capline`,
            `img2dataset` (one sample per caption: `.txt`, or `.json`'s `caption`) or `txt` (one caption per line).
        group_by: img2dataset layout: the `.json` field whose equal values are one image, merged for validation
            and test so every image is scored once with all its references (samples without it: by `sha256`,
            else by their image bytes); null scores every sample on its own.
        http: How `http(s)://` shards are read: `retries` after a dropped, stalled or 5xx-answered connection
            (resumed at the byte where it broke), `backoff_s` before the first (doubled each time), `stall_s`
            without a byte before a read counts as stalled (see `capline.data.http`).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_images: str | None = None,
        vocab: str | None = None,
        synthetic: SyntheticData | None = None,
        global_batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        max_len: int = 20,
        max_refs: int = 5,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        format: str = "auto",
        group_by: str | None = "url",
        http: HTTPOptions | None = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise DataConfigError(f"data.format {format!r} is not one of {', '.join(FORMATS)}")
        if synthetic is not None:
            given = [n for n, v in (("train_shards", train_shards), ("val_shards", val_shards), ("vocab", vocab)) if v]
            if given:
                raise DataConfigError(
                    f"data.synthetic and data.{given[0]} are both set; add --data.synthetic null to use your own shards"
                )
            from filelock import FileLock

            from capline.data.synthetic import ensure_synthetic_dataset

            # Every rank builds the data module; the lock lets one generate while the others wait, then reuse.
            Path(synthetic.root).mkdir(parents=True, exist_ok=True)
            with FileLock(str(Path(synthetic.root) / ".generate.lock")):
                made = ensure_synthetic_dataset(
                    synthetic.root, synthetic.num_train, synthetic.num_val, synthetic.image_size, synthetic.seed
                )
            train_shards, val_shards, vocab = made["train_shards"], made["val_shards"], made["vocab"]
            test_shards = test_shards or val_shards
        if vocab is None:
            raise DataConfigError("data.vocab is not set; point it to the vocab.json written by capline shards")
        self.vocab = Vocabulary.load(vocab)
        self.vocab_file = str(vocab)
        patterns = {"train_shards": train_shards, "val_shards": val_shards, "test_shards": test_shards}
        self.shards = {name: expand_shards(pattern, name) if pattern else None for name, pattern in patterns.items()}
        try:
            self.predict_files = find_image_files(predict_images) if predict_images else None
        except NoImagesError as err:
            raise DataConfigError(str(err)) from None
        if global_batch_size < 1:
            raise DataConfigError(f"data.global_batch_size must be positive, got {global_batch_size}")
        self.save_hyperparameters()
        self.global_batch_size, self.num_workers, self.seed = global_batch_size, num_workers, seed
        self.max_len, self.max_refs = max_len, max_refs
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.eval_batch_size = eval_batch_size
        self.format, self.group_by = format, group_by
        self.http = HTTPOptions(**http) if isinstance(http, dict) else http or HTTPOptions()
        http_reading.default_options = self.http
        self._readers: dict[str, LayoutReader] = {}  # per split, once its layout is known
        self._merged: dict[str, dict] = {}  # per evaluation split: its images' merged references
        self.rank, self.world_size = 0, 1
        self.image_config: dict | None = None
        self.train_refs = False  # training batches carry every reference (set when the model trains with SCST)
        self.train_stream: TrainStream | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already trained) from a checkpoint

    def per_device_batch_size(self, world_size: int) -> int:
        if self.global_batch_size % world_size:
            raise DataConfigError(
                f"data.global_batch_size {self.global_batch_size} is not divisible by the world size {world_size}; "
                f"use a multiple of {world_size}"
            )
        return self.global_batch_size // world_size

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
            self.image_config = self.trainer.lightning_module.encoder.data_config
            self.train_refs = bool(getattr(self.trainer.lightning_module, "needs_train_references", False))
        if self.image_config is None:
            raise DataConfigError("CaptionDataModule needs image_config (the encoder's timm data config)")
        self.batch_size = self.per_device_batch_size(self.world_size)
        self.transform = ImageTransform(self.image_config)

    def reader(self, name: str) -> LayoutReader:
        """The caption reader of a split's layout: `data.format`, or detected from its first samples."""
        if name not in self._readers:
            layout = self.format
            if layout == "auto":
                try:
                    layout = detect_shard_layout(self._require(name), name)
                except NoUsableDataError as err:
                    raise DataConfigError(str(err)) from None
            self._readers[name] = LayoutReader(layout, self.group_by)
        return self._readers[name]

    def _batcher(self, name: str, train: bool) -> CaptionBatcher:
        return CaptionBatcher(
            self.vocab, self.transform, self.max_len, self.max_refs, train=train, seed=self.seed,
            train_refs=train and self.train_refs, read_captions=self.reader(name),
        )  # fmt: skip

    def train_references(self) -> list[list[list[int]]]:
        """Every training sample's references as ids, as training batches carry them (read once, for SCST)."""
        from capline.data.references import training_references

        urls = self._require("train_shards")
        return training_references(urls, self.vocab, self.max_len, self.max_refs, self.reader("train_shards"))

    def _require(self, name: str) -> list[str]:
        if not self.shards[name]:
            raise DataConfigError(f"data.{name} is not set")
        return self.shards[name]

    def train_dataloader(self) -> DataLoader:
        urls = self._require("train_shards")
        counts = shard_counts(urls)
        samples = self.samples_per_epoch or (sum(counts) if counts is not None else None)
        if samples is None:
            raise DataConfigError(
                "data.samples_per_epoch is not set and remote training shards cannot be counted; set it to the "
                "number of training samples (or index local copies with capline shards index)"
            )
        if counts is None:
            log.warning(
                "the training shards have no sample counts: the data order assumes %d samples in each of them, "
                "so an epoch may repeat some samples and miss others (capline shards index counts them)",
                samples // len(urls),
            )  # fmt: skip
            counts = even_counts(samples, len(urls))
        if self.num_workers > self.batch_size:
            raise DataConfigError(
                f"data.num_workers {self.num_workers} is more than the {self.batch_size} images of a device's "
                f"batch: each worker makes part of every batch; use at most {self.batch_size} workers"
            )
        batcher = self._batcher("train_shards", train=True)
        try:
            check_usable(urls, "train_shards", batcher)  # before any worker starts or any step runs
        except NoUsableDataError as err:
            raise DataConfigError(str(err)) from None
        order = ElasticOrder(
            tuple(counts), self.global_batch_size, batches_per_epoch=max(1, samples // self.global_batch_size),
            seed=self.seed, block=-(-self.shuffle_buffer // self.global_batch_size),
        )  # fmt: skip
        self.train_stream = TrainStream(urls, batcher, order, self.rank, self.world_size)
        self.train_stream.http = self.http
        # The first epoch's loader iterator is created before on_train_epoch_start: position the stream now.
        self.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return self._loader(self.train_stream, stream_state=self)  # resumable: Lightning saves its position

    def _eval_loader(self, name: str) -> DataLoader:
        reader = self.reader(name)
        if reader.one_sample_per_caption and name not in self._merged:
            self._merged[name] = merge_image_samples(self._require(name), reader)
        stream = EvalStream(
            self._require(name), self._batcher(name, train=False), self.eval_batch_size or self.batch_size,
            self.rank, self.world_size, merged=self._merged.get(name),
        )  # fmt: skip
        stream.http = self.http
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val_shards")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test_shards")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_files is None:
            return self._eval_loader("test_shards")
        batch_size = self.eval_batch_size or self.batch_size
        return self._loader(ImageFileStream(self.predict_files, self.transform, batch_size, self.rank, self.world_size))

    def _loader(self, stream, stream_state=None) -> DataLoader:
        return RecyclingDataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=False,
            prefetch_factor=4 if self.num_workers else None,
            # Its own generator: creating workers must not draw from the global RNG, or a resumed run diverges.
            generator=torch.Generator().manual_seed(self.seed), stream_state=stream_state,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Positions the training stream at the start of `epoch`, or where a resumed checkpoint left it."""
        if self.train_stream is None:
            return
        resume_epoch, resume_batch = self._resume_at or (-1, 0)
        if resume_batch >= self.train_stream.order.batches_per_epoch:
            # Saved after the epoch's last batch, before the epoch ended (a step-boundary checkpoint): Lightning's
            # fit loop counts that epoch done and resumes in the next one without calling on_train_epoch_start,
            # so the stream serves the next epoch from its start.
            resume_epoch, resume_batch = resume_epoch + 1, 0
            epoch = max(epoch, resume_epoch)
        self.train_stream.set_epoch(epoch)
        self.train_stream.start_batch = resume_batch if epoch == resume_epoch else 0

    def state_dict(self) -> dict:
        """The training stream's position, saved in every checkpoint: (epoch, global batches consumed in it)."""
        if self.trainer is None or self.train_stream is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed,
                "global_batch_size": self.global_batch_size}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        if "epoch" in state_dict:
            saved = state_dict.get("global_batch_size", self.global_batch_size)
            if saved != self.global_batch_size:
                log.warning(
                    "resuming with data.global_batch_size %d, the checkpoint's was %d: the data order changes, so "
                    "the rest of this epoch may repeat or miss samples",
                    self.global_batch_size, saved,
                )  # fmt: skip
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches"]))
            if self.train_stream is not None:  # called by the loader, after train_dataloader positioned the stream
                self.set_epoch(self.trainer.current_epoch if self.trainer is not None else self._resume_at[0])
