"""What `capline fit` prints when it ends: where the checkpoints are, which W&B run, and how to caption with it."""

from __future__ import annotations

import os
import shlex


def fit_summary(trainer, config_path: str | None) -> str:
    """A few lines: the best checkpoint and its score, the last checkpoint, the W&B run, the caption command.

    Args:
        trainer: The trainer after `fit`.
        config_path: The `config.yaml` LightningCLI wrote for this run, if any.
    """
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") or ""
    last = getattr(callback, "last_model_path", "") or ""
    monitor = getattr(callback, "monitor", None) or "score"
    lines = [f"capline: fit ended at step {trainer.global_step}"]
    if best:
        score = callback.best_model_score
        lines.append(f"  best checkpoint: {best} ({monitor} {float(score):.4f})" if score is not None else best)
    else:
        lines.append(f"  best checkpoint: none yet (no validation has scored {monitor})")
    lines.append(f"  last checkpoint: {_with_step(last) if last else 'none'}")
    lines += [f"  W&B: {line}" for line in _wandb_lines(trainer)]
    ckpt = best or last
    if ckpt:
        if config_path and os.path.isfile(config_path):
            command = ["capline", "predict", "--config", config_path, "--ckpt_path", ckpt]
            command += ["--data.predict_images", "photos/"]
        else:
            command = ["capline", "caption", "--ckpt", ckpt, "photos/"]
        lines.append(f"  caption images: {shlex.join(command)}")
    return "\n".join(lines)


def _with_step(path: str) -> str:
    """The path and the global step recorded inside the file (read back, not assumed)."""
    from capline.checkpoints import training_position

    position = training_position(path)
    return f"{path} (step {position[0]})" if not isinstance(position, str) else f"{path} ({position})"


def _wandb_lines(trainer) -> list[str]:
    from lightning.pytorch.loggers import WandbLogger

    lines = []
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is None:
            continue
        if run.offline:
            lines.append(f"offline run {run.id}; upload it with: wandb sync {shlex.quote(run.settings.sync_dir)}")
        else:
            lines.append(f"run {run.url}")
    return lines
