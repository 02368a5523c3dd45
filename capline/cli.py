"""The `capline` command: LightningCLI with `fit`, `validate`, `test` and `predict`, and the tools of
`capline.commands` (`configs`, `shards`, `caption`, `evaluate`, `scene-check`).

    capline fit --config demo                                     # the CPU demo, data generated on first use
    capline fit --config configs/coco_show_tell.yaml --trainer.devices 8
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m capline fit --config configs/coco_show_tell.yaml --config configs/multinode.yaml
    capline fit --config configs/demo.yaml --ckpt_path last        # resume (starts fresh when there is none)
    capline test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings

import yaml
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from capline import rank_failure
from capline.callbacks.checkpoint import CaptionCheckpoint
from capline.callbacks.predictions import CaptionPredictionWriter
from capline.checkpoints import AtomicCheckpointIO, CheckpointError, CheckpointWriteError, read_checkpoint
from capline.config_files import expand_config_args
from capline.data.datamodule import CaptionDataModule, DataConfigError
from capline.models.encoder import EncoderConfigError
from capline.models.weights import WeightsError
from capline.module import CaptionModule
from capline.preemption import Preemption, install_signal_handlers
from capline.preflight import (
    OutputDirError,
    PrecisionError,
    check_batch_divides,
    check_output_dir,
    check_precision,
    continue_wandb_run,
    find_last_checkpoint,
    redact,
)
from capline.summary import fit_summary
from capline.vocab import VocabError

# Lightning's warnings that do not apply here: the streams give every dataloader worker its own part of the data,
# so their __len__ is exact; the pytree one is Lightning's own deprecation, nothing a user can act on.
warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
# Lightning hands prediction writers sampler indices; capline's streams have no sampler, and its writer names
# every image by its key and id instead, so the missing indices lose nothing.
warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices fetched from your dataloader.*")
# Outside any SLURM job, Lightning's "srun is available but not used" (printed wherever SLURM is installed) is noise.
if "SLURM_JOB_ID" not in os.environ:
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")
# Lightning's advertisement for its own cloud logger, printed at every start: capline logs to W&B.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud logging")
)

# How captions are searched: not part of the trained model, so `test`, `validate` and `predict` take them as asked.
DECODING_KEYS = ("val_beam_size", "test_beam_size", "length_penalty")
EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR: a checkpoint could not be written

# Mistakes in a config or its data: reported in one sentence, without a traceback.
USER_ERRORS = (
    DataConfigError,
    EncoderConfigError,
    WeightsError,
    VocabError,
    CheckpointError,
    PrecisionError,
    OutputDirError,
)


class CaptionCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        given = kwargs.get("args")
        self._argv = [str(a) for a in given] if isinstance(given, list) else sys.argv[1:]  # for the resume line
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The vocabulary is known once the data module exists (the demo generates it on first use).
        parser.link_arguments("data.vocab_file", "model.vocabulary", apply_on="instantiate")
        parser.add_lightning_class_args(CaptionCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": None,  # None: <trainer.default_root_dir>/checkpoints, pinned for resuming
                "checkpoint.filename": "step{step:07d}-cider{val/cider:.3f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/cider",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 3,
                "checkpoint.save_last": True,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._prepare_run()

    def _prepare_run(self) -> None:
        # Runs right after parsing, before Lightning reads the checkpoint's hyper-parameters: resolve `last`,
        # and refuse a bad checkpoint file in one sentence.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        root = config.trainer.get("default_root_dir") or os.getcwd()
        if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        _wandb_dir_follows_root(config, root)
        check_batch_divides(config)
        check_precision(config.trainer.get("precision"), config.trainer.get("accelerator"))
        if subcommand == "fit":  # a DDP rank that dies ends the run with one line saying how to resume
            rank_failure.install(self._argv, config.checkpoint.dirpath, root)
        if config.get("ckpt_path") == "last":
            refused: dict[str, str] = {}
            config.ckpt_path = find_last_checkpoint(config.checkpoint.dirpath, root, refused)
            for path, why in sorted(refused.items()):
                print(f"capline: --ckpt_path last skips {path}: {why}", file=sys.stderr)
            if config.ckpt_path is None and refused:
                raise CheckpointError(
                    f"--ckpt_path last found no checkpoint it can resume from in {config.checkpoint.dirpath} "
                    f"({len(refused)} refused, listed above); pass --ckpt_path FILE, or move those files away to "
                    "start a new run"
                )
            if config.ckpt_path is None:
                print(f"capline: no checkpoint in {config.checkpoint.dirpath} yet: starting a new run", file=sys.stderr)
        if config.get("ckpt_path"):
            checkpoint = read_checkpoint(config.ckpt_path)
            if subcommand == "fit":
                continue_wandb_run(config, checkpoint)
        self._configured = copy.deepcopy(config.get("model")) if config.get("ckpt_path") else None

    def _parse_ckpt_path(self) -> None:
        # Lightning >= 2.5.5 calls this after `parse_arguments`: the checkpoint's hyper-parameters replace the
        # configured ones... (older releases keep the configured ones, which is where this ends up anyway)
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        if getattr(self, "_configured", None) is not None:
            keys = None if subcommand == "fit" else DECODING_KEYS
            _keep_configured(self.config[subcommand], self._configured, keys,
                             "fit continues" if keys is None else subcommand)  # fmt: skip

    def instantiate_trainer(self, **kwargs):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            # capline's Preemption callback handles SLURM's signal; Lightning's would save inside the handler
            kwargs["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make saves atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(callback, Preemption) for callback in trainer.callbacks):
            trainer.callbacks.append(Preemption())  # last: after ModelCheckpoint at every hook
        return trainer

    def _log_resolved_config(self) -> None:
        """Sends the whole resolved config (trainer, model, data...) to the loggers, secrets redacted."""
        parser = self._parser(self.subcommand)
        config = redact(yaml.safe_load(parser.dump(self.config[self.subcommand], skip_check=True)))
        self.model.run_config = config  # checkpoints carry it, so a checkpoint alone rebuilds the model
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"config": config})

    def before_fit(self) -> None:
        # weights + two Adam moments, in float32: what a checkpoint holds, give or take
        params = sum(p.numel() for p in self.model.parameters())
        folder = self.config[self.subcommand].checkpoint.dirpath
        check_output_dir(folder, checkpoint_bytes=params * 4 * 3)
        self._log_resolved_config()

    before_validate = before_test = _log_resolved_config

    def before_predict(self) -> None:
        # `capline predict` writes its captions (predictions.jsonl, predictions_coco.json) unless told otherwise.
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(CaptionPredictionWriter())
        if self.config_init[self.subcommand].get("return_predictions") is None:
            self.config_init[self.subcommand]["return_predictions"] = False  # the writer has them: no second copy

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask
        if self.trainer.is_global_zero:
            config = os.path.join(log_dir, "config.yaml") if log_dir else None
            print(fit_summary(self.trainer, config), flush=True)


def _keep_configured(config, configured, keys: tuple[str, ...] | None, what: str) -> None:
    """...for `fit`, the configuration wins: a run continued from a checkpoint with other training settings (an
    SCST phase added, another schedule) trains with what was asked, and the log says what changed. For `test`,
    `validate` and `predict` the checkpoint's values stand (they describe the model that was trained), except how
    captions are searched (`DECODING_KEYS`: `--model.test_beam_size 5`, a length penalty), which is asked then."""
    wanted, loaded = vars(configured), vars(config.model)
    changed = [key for key, value in wanted.items() if key in loaded and loaded[key] != value]
    changed = [key for key in changed if keys is None or key in keys]
    for key in changed:
        loaded[key] = wanted[key]
    if changed:
        names = ", ".join(f"model.{key}" for key in changed)
        verb = "differs" if len(changed) == 1 else "differ"
        print(f"capline: {names} {verb} from the checkpoint's; {what} with the configured values", file=sys.stderr)


def _wandb_dir_follows_root(config, root: str) -> None:
    """W&B files go under `trainer.default_root_dir`, like the checkpoints, unless the logger's save_dir is set."""
    loggers = config.trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not hasattr(logger, "get") or "WandbLogger" not in str(logger.get("class_path", "")):
            continue
        init_args = logger.get("init_args")
        if init_args is not None and not init_args.get("save_dir") and not init_args.get("dir"):
            init_args.save_dir = root


def checkpoint_write_failed(err: CheckpointWriteError) -> str:
    """One sentence: what could not be written and why, that nothing before is lost, and how to go on."""
    free = f", {err.free_bytes / 2**20:.0f} MiB free there" if err.free_bytes is not None else ""
    step = f" of step {err.step}" if err.step is not None else ""
    advice = rank_failure.resume_advice() or "--ckpt_path last"
    return (
        f"the checkpoint{step} could not be written to {err.path} ({err.strerror}{free}); every earlier checkpoint "
        f"is intact. Make room there, then resume with: {advice}"
    )


def cli_main(args: list[str] | None = None) -> None:
    """Runs Lightning's subcommands; `args` lets tests drive the real command in-process (`capline.entry.main` is
    the `capline` command: it runs the other subcommands without importing Lightning)."""
    argv = expand_config_args(list(args if args is not None else sys.argv[1:]))  # `--config demo`: shipped configs
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself (given `args` too, it warns)
    if argv[:1] == ["fit"]:
        install_signal_handlers()  # a preemption signal during start-up is kept for the first step boundary
    try:
        CaptionCLI(
            CaptionModule,
            CaptionDataModule,
            args=None if args is None else argv,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml instead of refusing
            auto_configure_optimizers=False,
        )
    except USER_ERRORS as err:
        print(f"capline: error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointWriteError as err:
        print(f"capline: error: {checkpoint_write_failed(err)}", file=sys.stderr)
        sys.exit(EXIT_IO_ERROR)
    except Exception as err:
        failed = rank_failure.failed_child_behind(err)
        if failed is None:
            raise
        rank_failure.report(*failed)  # rank 0 failed because another rank died: that rank's story, in one line
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
