"""The `capline` command: LightningCLI with `fit`, `validate`, `test` and `predict`.

    capline fit --config configs/demo.yaml                        # the CPU demo, data generated on first use
    capline fit --config configs/coco_show_tell.yaml --trainer.devices 8
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m capline fit --config configs/coco_show_tell.yaml --config configs/multinode.yaml
    capline fit --config configs/demo.yaml --ckpt_path last        # resume (starts fresh when there is none)
    capline test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import re
import sys

import yaml

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from capline.data.datamodule import CaptionDataModule, DataConfigError
from capline.models.encoder import EncoderConfigError
from capline.module import CaptionModule
from capline.vocab import VocabError

_SECRET = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)

# Mistakes in a config or its data: reported in one sentence, without a traceback.
USER_ERRORS = (DataConfigError, EncoderConfigError, VocabError)


class CaptionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The vocabulary is known once the data module exists (the demo generates it on first use).
        parser.link_arguments("data.vocab_file", "model.vocabulary", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
            root = config.trainer.get("default_root_dir") or os.getcwd()
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")


    def _log_resolved_config(self) -> None:
        """Sends the whole resolved config (trainer, model, data...) to the loggers, secrets redacted."""
        parser = self._parser(self.subcommand)
        config = yaml.safe_load(parser.dump(self.config[self.subcommand], skip_check=True))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"config": redact(config)})

    before_fit = before_validate = before_test = _log_resolved_config


def redact(value):
    """Replaces the values of keys that look like credentials with "<redacted>"."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def cli_main(args: list[str] | None = None) -> CaptionCLI | None:
    """Runs the CLI; `args` lets tests drive the real command in-process."""
    try:
        return CaptionCLI(
            CaptionModule,
            CaptionDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml instead of refusing
            auto_configure_optimizers=False,
        )
    except USER_ERRORS as err:
        print(f"capline: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
