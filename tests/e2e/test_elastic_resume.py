"""Elastic resume through the real CLI with 2 gloo processes: a run killed mid-epoch on N processes x W workers
and resumed on M x V trains on every sample of the epoch exactly once (as `ConsumedSamples` records it); on the
same topology its weights are bitwise those of a run never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NUM_TRAIN, BATCH = 96, 8  # 12 global batches per epoch
CHECKPOINT_EVERY, KILLED_AT = 4, 6  # last.ckpt at step 4 (after validating), killed as step 6 starts: mid-epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    from capline.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("elastic")
    made = ensure_synthetic_dataset(root, num_train=NUM_TRAIN, num_val=8, image_size=64, seed=0, shard_size=40)
    return made  # 3 training shards of 40, 40 and 16 samples: fewer than 2 x 2 workers, and uneven


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def fit(tmp_path: Path, shards: dict, name: str, devices: int, workers: int, *extra: str):
    run = tmp_path / name
    args = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", shards["train_shards"],
        "--data.val_shards", shards["val_shards"],
        "--data.vocab", shards["vocab"],
        "--data.global_batch_size", str(BATCH),
        "--data.num_workers", str(workers),
        "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.max_steps", str(NUM_TRAIN // BATCH),  # one epoch
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.val_check_interval", str(CHECKPOINT_EVERY),  # each validation writes last.ckpt
        "--model.encoder_finetuning.freeze_steps", "2",  # the encoder trains too: its weights must match as well
        "--trainer.callbacks+=capline.callbacks.ConsumedSamples",
        *extra,
    ]  # fmt: skip
    return subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), capture_output=True, text=True, timeout=500)


def killed_then_resumed(tmp_path, shards, before: tuple[int, int], after: tuple[int, int]) -> Path:
    killed = fit(tmp_path, shards, "run", *before, "--trainer.callbacks+=killer.KillAtStep",
                 "--trainer.callbacks.step", str(KILLED_AT))  # fmt: skip
    assert killed.returncode != 0  # SIGKILLed
    assert (tmp_path / "run/consumed/rank0.jsonl").is_file(), killed.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == CHECKPOINT_EVERY
    resumed = fit(tmp_path, shards, "run", *after, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp_path / "run"


def consumed(run: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((run / "consumed").glob("rank*.jsonl")) for line in open(path)]


def all_training_keys(shards: dict) -> list[str]:
    import webdataset as wds

    urls = wds.shardlists.expand_urls(shards["train_shards"])
    return sorted(s["__key__"] for s in wds.tariterators.tarfile_samples([{"url": u} for u in urls]))


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["2x1-to-1x2", "1x2-to-2x1"])
def test_an_epoch_killed_and_resumed_on_another_topology_trains_every_sample_once(tmp_path, shards, before, after):
    records = consumed(killed_then_resumed(tmp_path, shards, before, after))
    steps = sorted({r["step"] for r in records})
    assert steps == list(range(NUM_TRAIN // BATCH))  # the killed run's steps 4 and 5 were dropped, then redone
    assert {r["rank"] for r in records if r["step"] < CHECKPOINT_EVERY} == set(range(before[0]))
    assert {r["rank"] for r in records if r["step"] >= CHECKPOINT_EVERY} == set(range(after[0]))
    assert all(len(r["keys"]) == BATCH // (before if r["step"] < CHECKPOINT_EVERY else after)[0] for r in records)
    keys = sorted(k for r in records for k in r["keys"])
    assert keys == all_training_keys(shards)  # each exactly once


@pytest.mark.slow
def test_two_by_two_resumed_on_two_by_two_equals_a_run_never_stopped(tmp_path, shards):
    straight = fit(tmp_path, shards, "straight", 2, 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = killed_then_resumed(tmp_path, shards, (2, 2), (2, 2))
    assert sorted(map(json.dumps, consumed(run))) == sorted(map(json.dumps, consumed(tmp_path / "straight")))
    expected = torch.load(tmp_path / "straight/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert expected["global_step"] == got["global_step"] == NUM_TRAIN // BATCH
    different = [k for k in expected["state_dict"] if not torch.equal(expected["state_dict"][k], got["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
