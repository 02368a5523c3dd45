"""Shared by the preemption tests: the shrunken real demo config, the probe's records, checkpoint comparisons."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_PATH = ROOT / "tests" / "e2e"  # preemption_probe.StepProbe lives there


def fit_args(run: Path, shards: dict, steps: int, devices: int = 1, workers: int = 1) -> list[str]:
    """`capline fit` arguments: the demo config on the session's small shards, a validation every 6 steps."""
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", shards["train_shards"],
        "--data.val_shards", shards["val_shards"],
        "--data.vocab", shards["vocab"],
        "--data.global_batch_size", "16",
        "--data.num_workers", str(workers),
        "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
        "--checkpoint.every_n_train_steps", "4",  # regular checkpoints between validations too
        "--model.encoder_finetuning.freeze_steps", "4",  # the recipe's phases are part of what must resume
        "--model.encoder_finetuning.warmup_steps", "2",
        "--trainer.callbacks+=preemption_probe.StepProbe", "--trainer.callbacks.out_dir", str(run / "probe"),
    ]  # fmt: skip


def run_env(tmp_path: Path, base: dict | None = None) -> dict:
    home = tmp_path / "wandb-home"
    return {**(os.environ if base is None else base), "WANDB_MODE": "offline", "WANDB_DIR": str(home),
            "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{PROBE_PATH}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def probe(run: Path, rank: int = 0) -> list[dict]:
    """What rank `rank` recorded at each step boundary, all attempts in order."""
    path = run / "probe" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def differing_tensors(expected: Path, got: Path) -> list[str]:
    a, b = load(expected)["state_dict"], load(got)["state_dict"]
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def checkpoint_names(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir()}
