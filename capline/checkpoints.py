"""Checkpoints: safe reading with a clear error for bad files, and compatibility with the configured model."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from capline.errors import causes, first_line
from capline.vocab import Vocabulary


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not fit the configured model."""


def read_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint on the CPU with `weights_only=True` (no code from the file runs), memory-mapped.

    Raises:
        CheckpointError: The file is missing, truncated, not a PyTorch checkpoint, or not a capline one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated, not a PyTorch checkpoint, or holds objects "
            f"that are unsafe to load ({first_line(err, 160)})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict)")
    if "vocab" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a capline checkpoint (no vocabulary inside)")
    return checkpoint


def check_compatible(checkpoint: dict, vocab: Vocabulary, state: dict) -> None:
    """Raises `CheckpointError` naming the first difference, before any weight is loaded."""
    words = checkpoint.get("vocab")
    if words is not None and words != vocab.words:
        raise CheckpointError(
            f"the checkpoint's vocabulary ({len(words)} words) differs from the configured one ({len(vocab)} words); "
            "use the vocab.json the checkpoint was trained with"
        )
    saved = checkpoint.get("state_dict", {})
    missing = sorted(set(state) - set(saved))
    unexpected = sorted(set(saved) - set(state))
    reshaped = [k for k in state if k in saved and tuple(saved[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or reshaped:
        if reshaped:
            k = reshaped[0]
            example = f"{k} is {tuple(saved[k].shape)} in the checkpoint but {tuple(state[k].shape)} in the config"
        else:
            example = f"{(missing or unexpected)[0]} is only in the {'config' if missing else 'checkpoint'}"
        raise CheckpointError(
            f"the checkpoint was trained with another architecture than the configured model "
            f"({len(missing)} tensors missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; "
            f"e.g. {example})"
        )


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota): every earlier checkpoint is intact."""

    def __init__(self, path: Path, err: OSError, step: int | None = None):
        super().__init__(err.errno, err.strerror)
        self.path, self.step = path, step
        try:
            self.free_bytes: int | None = shutil.disk_usage(path.parent).free
        except OSError:
            self.free_bytes = None


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(err: BaseException | None) -> OSError | None:
    """The full-disk error behind `err`, if any (torch.save reports a failed write as a RuntimeError raised while
    handling the OSError)."""
    return next((e for e in causes(err) if isinstance(e, OSError) and e.errno in _DISK_FULL), None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it over the target.

    A rename within one file system is atomic, so a kill or a full disk during a save leaves the previous
    checkpoint intact. (Lightning's own save goes through a temporary file in /tmp, whose final move is a plain
    copy when the checkpoint folder is on another file system, as it often is on clusters.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            full = _disk_full(err)
            if full is not None:
                raise CheckpointWriteError(path, full, checkpoint.get("global_step")) from None
            raise


def training_position(path: str | Path) -> tuple[int, int] | str:
    """(global step, training batches completed) recorded in a checkpoint, or why it cannot resume training (a
    few words: truncated, a pickle that would run code, a weights-only file without loop state...).

    Two checkpoints of one step differ in whether the step's validation had run: one written after it (Lightning
    counts the batch as completed) is the later of the two. Loading is memory-mapped: no tensor data is read.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "it holds objects that would run code when loaded (refused by weights_only)"
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        if "mmap can only be used" in str(err):
            return "it is not in PyTorch's zip format (a legacy torch.save file, or not a checkpoint at all)"
        if "zip archive" in str(err) or isinstance(err, (EOFError, zipfile.BadZipFile)):
            return "it is truncated or not a PyTorch checkpoint"
        return f"it cannot be read ({first_line(err, 100)})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "it is not a Lightning checkpoint (no state_dict)"
    if "global_step" not in checkpoint or "loops" not in checkpoint:
        return "it holds weights only (no training state to resume)"
    progress = checkpoint["loops"].get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return int(checkpoint["global_step"]), int(progress.get("total", {}).get("completed", 0))


def newest_checkpoint(paths, refused: dict[str, str] | None = None) -> str | None:
    """The checkpoint among `paths` furthest into training by its recorded position (step, then batches
    completed, then modification time), whatever the file names. Files that cannot resume training are skipped;
    `refused`, when given, receives each one's path and why."""
    positions = {str(p): training_position(p) for p in paths}
    if refused is not None:
        refused.update({p: why for p, why in positions.items() if isinstance(why, str)})
    usable = [(position, os.path.getmtime(p), p) for p, position in positions.items() if not isinstance(position, str)]
    return max(usable)[2] if usable else None
