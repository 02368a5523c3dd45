"""Two-process DDP on CPU (gloo) through the real `capline` CLI: no hang, disjoint data, exact scores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home),
            "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def base_args(tmp_path: Path, shards: dict, devices: int, batch: int = 8) -> list[str]:
    run = tmp_path / f"run{devices}"
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", shards["train_shards"],
        "--data.val_shards", shards["val_shards"],
        "--data.vocab", shards["vocab"],
        "--data.global_batch_size", str(batch),
        "--data.num_workers", "1",
        "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> dict:
    """3 training shards (2 ranks x 1 worker: uneven) and 3 validation shards of different sizes."""
    from capline.data.shards import ShardWriter, encode_jpeg, shard_pattern
    from capline.data.synthetic import generate_scene
    from capline.vocab import Vocabulary

    out = tmp_path_factory.mktemp("uneven")
    captions = []
    for split, sizes, offset in (("train", [64, 40, 56], 0), ("val", [13, 7, 10], 10_000)):
        index = offset
        for shard_no, size in enumerate(sizes):
            with ShardWriter(out / f"part{shard_no}", split, shard_size=size) as writer:
                for _ in range(size):
                    image, caps, _ = generate_scene(index)
                    writer.write((f"{index:010d}", encode_jpeg(image), "jpg", {"image_id": index, "captions": caps}))
                    captions += caps
                    index += 1
    Vocabulary.build(captions, min_count=1).save(out / "vocab.json")
    files = {split: sorted(str(p) for p in out.glob(f"part*/{split}-*.tar")) for split in ("train", "val")}
    for split, paths in files.items():
        for i, path in enumerate(paths):  # flatten into one folder with distinct names
            os.replace(path, out / f"{split}-{i:06d}.tar")
    return {
        "train_shards": shard_pattern(out, "train", 3),
        "val_shards": shard_pattern(out, "val", 3),
        "vocab": str(out / "vocab.json"),
        "num_val": 30,
    }


def test_two_process_fit_with_uneven_shards_has_disjoint_ranks_and_identical_encoders(tmp_path, uneven_shards):
    record = tmp_path / "record"
    args = base_args(tmp_path, uneven_shards, devices=2) + [
        "--data.samples_per_epoch", "48",  # 6 steps of 8 images (4 per rank) per epoch
        "--trainer.max_steps", "10",  # 2 epochs (the second cut short); the encoder trains from step 4
        "--trainer.val_check_interval", "5",
        "--model.encoder_finetuning.freeze_steps", "4",
        "--trainer.callbacks+=recorder.RankRecorder", "--trainer.callbacks.out_dir", str(record),
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sync_dist" not in result.stderr  # epoch-level values are logged already reduced, as Lightning expects
    # channels-last batches, channels-last weights: DDP's gradient buckets match the gradients' layout
    assert "Grad strides do not match bucket view strides" not in result.stderr
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [10, 10]
    for epoch in ("0", "1"):
        keys0, keys1 = set(ranks[0]["keys"][epoch]), set(ranks[1]["keys"][epoch])
        assert len(keys0) == len(ranks[0]["keys"][epoch])  # no sample twice on a rank
        assert not keys0 & keys1, f"epoch {epoch}: ranks share {len(keys0 & keys1)} samples"
    assert len(ranks[0]["keys"]["0"]) == len(ranks[1]["keys"]["0"]) == 6 * 4
    assert len(ranks[0]["keys"]["1"]) == len(ranks[1]["keys"]["1"]) == 4 * 4
    # after 6 fine-tuning steps the encoder weights are bitwise the same on both ranks
    assert ranks[0]["encoder_sha256"] == ranks[1]["encoder_sha256"]
    assert time.time() - start < 300


def validate(tmp_path: Path, shards: dict, devices: int, ckpt: Path) -> tuple[float, int]:
    args = base_args(tmp_path, shards, devices=devices, batch=4) + ["--ckpt_path", str(ckpt)]
    result = subprocess.run([CAPLINE, "validate", *args], env=env(tmp_path), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sync_dist" not in result.stderr
    cider = float(re.search(r"val/cider\s*│?\s*([0-9.]+)", result.stdout).group(1))
    images = int(float(re.search(r"val/num_images\s*│?\s*([0-9.]+)", result.stdout).group(1)))
    return cider, images


def test_validate_on_one_and_two_processes_gives_the_same_cider(tmp_path, uneven_shards):
    args = base_args(tmp_path, uneven_shards, devices=1) + [
        "--data.samples_per_epoch", "96", "--trainer.max_steps", "8", "--trainer.val_check_interval", "8"]  # fmt: skip
    subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), check=True, capture_output=True, timeout=600)
    ckpt = tmp_path / "run1/checkpoints/last.ckpt"
    single, images_single = validate(tmp_path, uneven_shards, 1, ckpt)
    double, images_double = validate(tmp_path, uneven_shards, 2, ckpt)
    assert images_single == images_double == uneven_shards["num_val"]
    assert abs(single - double) <= 1e-6


def test_global_batch_not_divisible_by_world_size_fails_fast(tmp_path, uneven_shards):
    args = base_args(tmp_path, uneven_shards, devices=2, batch=9) + ["--data.samples_per_epoch", "96"]
    start = time.time()
    result = subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "global_batch_size 9 is not divisible by the world size 2" in result.stderr
    assert time.time() - start < 120
