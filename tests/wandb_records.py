"""Reads what a real offline W&B run wrote to its `run-<id>.wandb` record log (no mock involved)."""

from __future__ import annotations

from pathlib import Path

from capline.loggers import read_wandb_run as read_run

__all__ = ["read_run", "run_files", "series"]


def run_files(save_dir: str | Path) -> list[Path]:
    """Every `run-*.wandb` file under a logger's save_dir, oldest first."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))


def series(run: dict, key: str) -> list:
    """The logged values of one key, in logging order."""
    return [row[key] for row in run["history"] if key in row]
