"""Shared fixtures: small real shard sets written once per test session, W&B kept offline and local."""

from __future__ import annotations

import os

import pytest
import torch

from capline.data.synthetic import ensure_synthetic_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest runs tests in parallel processes (`-n`, see pyproject.toml): one torch thread in each, and in every
    # process a test starts, so that two workers do not oversubscribe the cores (OpenMP threads spin-wait, and
    # small ops then run many times slower). A user's own OMP_NUM_THREADS wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    """A small synthetic dataset: 512 training scenes in 4 shards, 96 validation scenes in 2 shards."""
    root = tmp_path_factory.mktemp("synthetic")
    return ensure_synthetic_dataset(root, num_train=512, num_val=96, image_size=64, seed=0, shard_size=128) | {
        "root": str(root)
    }


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path, monkeypatch):
    """Every test that touches W&B writes its real offline run files under its own tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(tmp_path / "wandb-home", exist_ok=True)
