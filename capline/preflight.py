"""Checks run before anything heavy starts: config values that cannot work, what `--ckpt_path last` means,
and which W&B run a resumed job continues. Each failure is one sentence naming the value."""

from __future__ import annotations

import glob
import os
import re

from capline.data.datamodule import DataConfigError

_SECRET = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)


class PrecisionError(ValueError):
    """A precision the hardware cannot run."""


def check_batch_divides(config) -> None:
    """Fails before any process starts when the global batch cannot be split evenly over the devices."""
    devices, nodes = config.trainer.get("devices"), config.trainer.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    batch = config.data.get("global_batch_size")
    if isinstance(devices, int) and devices > 0 and isinstance(batch, int):
        world_size = devices * nodes
        if batch % world_size:
            raise DataConfigError(
                f"data.global_batch_size {batch} is not divisible by the world size {world_size} "
                f"({nodes} node(s) x {devices} device(s)); use a multiple of {world_size}"
            )


def check_precision(precision, accelerator) -> None:
    """Refuses, before any work, a precision the chosen hardware cannot run."""
    import torch

    precision = str(precision)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator in ("auto", None) and torch.cuda.is_available())
    if precision.startswith("16") and not on_gpu:
        raise PrecisionError(f"trainer.precision {precision!r} needs a GPU; on CPU use bf16-mixed or 32-true")
    if precision.startswith("bf16") and on_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"this GPU cannot run trainer.precision {precision!r}; use 16-mixed or 32-true")


def find_last_checkpoint(dirpath: str, root: str, refused: dict[str, str] | None = None) -> str | None:
    """What `--ckpt_path last` means: of every checkpoint in `dirpath` (regular, `last`, preemption) and Lightning's
    SLURM checkpoints `root/hpc_ckpt_*.ckpt`, the one furthest into training by its recorded global step.
    Half-written saves (`.*.tmp`) are not candidates, nor are files that cannot resume training (listed in
    `refused` with the reason, when given)."""
    from capline.checkpoints import newest_checkpoint

    return newest_checkpoint(
        glob.glob(os.path.join(dirpath, "*.ckpt")) + glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt")), refused
    )


def continue_wandb_run(config, checkpoint: dict) -> None:
    """Points a WandbLogger at the run a checkpoint was logged to, so a resumed job continues that run."""
    logger = config.trainer.get("logger")
    if not logger or "WandbLogger" not in str(logger.get("class_path", "")):
        return
    run_id = checkpoint.get("wandb_run_id")
    if run_id and not logger.init_args.get("id"):
        logger.init_args.id = run_id
        logger.init_args.resume = "allow"


def redact(value):
    """Replaces the values of keys that look like credentials with "<redacted>"."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class OutputDirError(OSError):
    """An output folder that cannot be written, or lacks the room for checkpoints."""


def check_output_dir(folder: str, checkpoint_bytes: int) -> None:
    """Fails before training when `folder` is not writable or has less free space than two checkpoints need
    (the new one is written beside the last good one, then renamed over it)."""
    import shutil
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write checkpoints to {folder!r}: {err.strerror or err}") from None
    free = shutil.disk_usage(folder).free
    if free < 2 * checkpoint_bytes:
        raise OutputDirError(
            f"only {free / 2**20:.0f} MiB free in {folder!r}; a checkpoint needs about "
            f"{checkpoint_bytes / 2**20:.0f} MiB and two must fit while one is written"
        )
