"""`capline predict` writes every image's caption once, over test shards or a folder, on 1 and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home)}  # fmt: skip


def data_args(data: dict) -> list[str]:
    return [
        "--config", str(ROOT / "configs/demo.yaml"), "--data.synthetic", "null",
        "--data.train_shards", data["train_shards"], "--data.val_shards", data["val_shards"],
        "--data.test_shards", data["val_shards"], "--data.vocab", data["vocab"],
        "--data.global_batch_size", "8", "--data.num_workers", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_data) -> Path:
    run = tmp_path_factory.mktemp("predict-fit")
    args = data_args(synthetic_data) + [
        "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
    ]  # fmt: skip
    result = subprocess.run([CAPLINE, "fit", *args], env=env(run), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints/last.ckpt"


def predict(tmp_path: Path, data: dict, ckpt: Path | None, devices: int, *extra: str) -> subprocess.CompletedProcess:
    args = data_args(data) + (["--ckpt_path", str(ckpt)] if ckpt else []) + [
        "--trainer.default_root_dir", str(tmp_path / "out"),
        "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto", *extra,
    ]  # fmt: skip
    return subprocess.run([CAPLINE, "predict", *args], env=env(tmp_path), capture_output=True, text=True, timeout=600)


def read_outputs(folder: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return lines, json.loads((folder / "predictions_coco.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_predict_over_test_shards_captions_every_sample_once(tmp_path, synthetic_data, checkpoint, devices):
    result = predict(tmp_path, synthetic_data, checkpoint, devices)
    assert result.returncode == 0, result.stderr[-3000:]
    lines, coco = read_outputs(tmp_path / "out")
    num_val = 96  # the synthetic_data fixture's validation scenes, used as test shards here
    assert len(lines) == num_val and len({line["key"] for line in lines}) == num_val
    # a two-step model may end a caption at once: "" is a caption too
    assert all(set(line) == {"image_id", "caption", "key"} and isinstance(line["caption"], str) for line in lines)
    assert sorted(r["image_id"] for r in coco) == sorted(line["image_id"] for line in lines)
    assert all(set(r) == {"image_id", "caption"} for r in coco)
    assert "Couldn't infer the batch indices" not in result.stderr


def write_images(folder: Path) -> set[str]:
    """Every mode and format the loader must take, at odd sizes; returns the readable files."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "COCO_val2014_000000000042.jpg")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.jpeg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 90, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (70, 40)).astype(np.uint16)).save(folder / "deep-16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.PNG")
    Image.fromarray(rgb[:64, :64]).save(folder / "small.webp")
    Image.fromarray(rng.integers(0, 255, (1, 3000, 3), dtype=np.uint8)).save(folder / "strip.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    Image.fromarray(rgb).save(folder / "nested/ignored.jpg")
    return {str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")} - {
        str(folder / "broken.jpg")
    }


@pytest.mark.slow
def test_predict_over_a_folder_on_two_processes_skips_and_lists_unreadable_files(tmp_path, synthetic_data, checkpoint):
    readable = write_images(tmp_path / "photos")
    result = predict(tmp_path, synthetic_data, checkpoint, 2, "--data.predict_images", str(tmp_path / "photos"),
                     "--data.eval_batch_size", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines, coco = read_outputs(tmp_path / "out")
    assert [line["file"] for line in lines] == sorted(readable)  # each once, across 2 ranks x 1 worker
    assert all(set(line) == {"image_id", "caption", "file"} for line in lines)
    assert {"image_id": 42, "caption": lines[0]["caption"]} in coco  # COCO file names give COCO ids
    assert len(coco) == len(readable)
    unreadable = (tmp_path / "out/predictions_unreadable.txt").read_text().splitlines()
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{tmp_path / 'photos/broken.jpg'}\tcorrupt_image")
    assert "skipped 1 unreadable image(s)" in result.stderr


def test_predict_over_an_empty_folder_fails_in_one_sentence(tmp_path, synthetic_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    result = predict(tmp_path, synthetic_data, None, 1, "--data.predict_images", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    folder = str(tmp_path / "empty")
    assert f"capline: error: data.predict_images: the folder {folder!r} holds no JPEG, PNG or WebP" in result.stderr


def test_predict_with_a_checkpoint_of_another_architecture_fails_in_one_sentence(tmp_path, synthetic_data, checkpoint):
    result = predict(
        tmp_path, synthetic_data, checkpoint, 1, "--model.decoder.class_path", "capline.models.ShowTellDecoder"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("capline: error:")]) == 1
    assert not (tmp_path / "out/predictions.jsonl").exists()
