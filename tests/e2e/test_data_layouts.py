"""Shards made elsewhere, through the real `capline` command: img2dataset's (written by the real img2dataset from
file:// URLs), CLIP-benchmark's (webdataset's ShardWriter: .webp + one caption a line) served by an HTTP server on
127.0.0.1 and resumed over it, and shard sets without one usable sample (exit status 2, one sentence)."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from wandb_records import read_run, run_files, series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGES, CAPTIONS = 4, 5  # validation images, references each
WORDS = "a red blue green small large cat dog ball box sits on near the table grass".split()

pytestmark = pytest.mark.slow


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    clean = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return clean | {
        "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "NO_ALBUMENTATIONS_UPDATE": "1",
    }  # fmt: skip


def photo(index: int) -> Image.Image:
    rng = np.random.default_rng(index)
    pixels = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64 px, 8 px blocks
    return Image.fromarray(pixels)


def caption(image: int, k: int) -> str:
    rng = np.random.default_rng(1000 * image + k)
    return " ".join(rng.choice(WORDS, 6))


def run(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)


def make_vocab(tmp_path: Path, shards: str) -> str:
    vocab = tmp_path / "vocab.json"
    result = run(tmp_path, [sys.executable, "-m", "capline", "shards", "vocab", "--shards", shards,
                            "--out", str(vocab), "--min-count", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return str(vocab)


def fit(tmp_path: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        "--config", str(ROOT / "configs/demo.yaml"), "--data.synthetic", "null",
        "--trainer.default_root_dir", str(root), "--data.global_batch_size", "4", "--data.num_workers", "1",
        "--data.shuffle_buffer", "1", "--trainer.log_every_n_steps", "1", *overrides,
    ]  # fmt: skip
    return run(tmp_path, [CAPLINE, "fit", *args])


def logged(root: Path) -> list[dict]:
    return [read_run(f) for f in run_files(root)]


def samples_table_references(root: Path) -> list[int]:
    """References per image in the last val/samples table W&B wrote (CaptionSamples joins them with ' | ')."""
    tables = sorted(root.glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json"))
    table = json.loads(tables[-1].read_text())
    column = table["columns"].index("references")
    return [len(row[column].split(" | ")) for row in table["data"]]


def img2dataset_command() -> str:
    """The img2dataset command, installed as a tool in its own venv (it pins webdataset<0.3, which capline's own
    environment need not): `CAPLINE_IMG2DATASET`, else `img2dataset` on PATH or beside this Python. CI
    (CAPLINE_CI=1, `.ci/run` installs it) fails when it is missing; elsewhere the tests that need it skip."""
    beside = Path(sys.executable).with_name("img2dataset")
    found = os.environ.get("CAPLINE_IMG2DATASET") or shutil.which("img2dataset") or (beside.exists() and str(beside))
    if not found:
        tool = ".venv-img2dataset/bin"
        message = f"img2dataset is not installed: python3 -m venv .venv-img2dataset && {tool}/pip install img2dataset, "
        message += f"then CAPLINE_IMG2DATASET={tool}/img2dataset"
        if os.environ.get("CAPLINE_CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(found)


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory) -> dict:
    """4 photos with 5 captions each, one url/caption row per caption: img2dataset writes 20 samples in 3 shards
    of 8, so one photo's samples straddle two shards."""
    root = tmp_path_factory.mktemp("img2dataset")
    rows = []
    for i in range(IMAGES):
        photo(i).save(root / f"COCO_val2014_{i + 1:012d}.jpg", quality=95)
        rows += [(f"file://{root}/COCO_val2014_{i + 1:012d}.jpg", caption(i, k)) for k in range(CAPTIONS)]
    with open(root / "list.csv", "w", newline="") as file:
        csv.writer(file).writerows([("url", "caption"), *rows])
    command = [
        img2dataset_command(), "--url_list", str(root / "list.csv"),
        "--input_format", "csv", "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
        "--output_folder", str(root / "out"), "--number_sample_per_shard", "8", "--processes_count", "1",
        "--thread_count", "2", "--resize_mode", "no", "--enable_wandb", "False",
    ]  # fmt: skip
    result = run(root, command)
    assert result.returncode == 0, result.stderr[-2000:]
    shards = str(root / "out/{00000..00002}.tar")
    assert sum(1 for _ in wds.WebDataset(shards, shardshuffle=False)) == IMAGES * CAPTIONS
    return {"shards": shards, "folder": root / "out", "vocab": make_vocab(root, shards)}


def test_img2dataset_shards_train_and_validate_each_image_once(tmp_path, img2dataset_shards):
    # A fourth training shard whose 4 samples are all undecodable. The elastic order spreads a shard over the lanes
    # of the global batch, so with a batch of 1 each of them is a batch without a usable sample, skipped.
    with wds.TarWriter(str(tmp_path / "bad.tar")) as writer:
        for k in range(4):
            meta = {"caption": "a cat", "url": f"file:///bad{k}.jpg", "key": f"9{k}", "status": "success"}
            writer.write({"__key__": f"9999{k}", "jpg": b"not a jpeg", "txt": "a cat", "json": meta})
    folder = img2dataset_shards["folder"]
    train = ",".join([str(folder / f"{i:05d}.tar") for i in range(3)] + [str(tmp_path / "bad.tar")])
    root = tmp_path / "run"
    result = fit(
        tmp_path, root, "--data.train_shards", f"[{train}]", "--data.val_shards", img2dataset_shards["shards"],
        "--data.vocab", img2dataset_shards["vocab"], "--data.global_batch_size", "1",
        "--trainer.max_steps", "24", "--trainer.val_check_interval", "24",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.format auto: data.train_shards holds img2dataset shards" in result.stderr
    assert "data.format auto: data.val_shards holds img2dataset shards" in result.stderr
    (history,) = logged(root)
    assert series(history, "val/num_images") == [IMAGES]  # 20 samples, 4 images, each scored once
    assert samples_table_references(root) and set(samples_table_references(root)) == {CAPTIONS}
    # 24 samples counted (img2dataset's *_stats.json, and the bad shard's tar headers): 24 batches of 1 an epoch,
    # 4 of them empty, so 20 steps; the 4 steps more come from the next epoch.
    assert series(history, "data/skipped/corrupt_image")[0] == 4
    assert series(history, "data/empty_batches")[-1] >= 4
    assert torch.load(root / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 24


@pytest.fixture(scope="module")
def clip_benchmark_server(tmp_path_factory):
    """CLIP-benchmark's layout (keys s%07d, lossless .webp, a .txt of every caption) served over HTTP."""
    root = tmp_path_factory.mktemp("clip-benchmark")
    for split, count in (("train", 8), ("val", IMAGES)):
        with wds.ShardWriter(str(root / f"{split}-%d.tar"), maxcount=4) as writer:
            for i in range(count):
                buffer = io.BytesIO()
                photo(100 * (split == "val") + i).save(buffer, format="WEBP", lossless=True)
                text = "\n".join(caption(i, k) for k in range(CAPTIONS))
                writer.write({"__key__": f"s{i:07d}", "webp": buffer.getvalue(), "txt": text})
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 -- the base class's name
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "requests": requests, "root": root}
    server.shutdown()


def test_remote_clip_benchmark_shards_train_validate_and_resume_over_http(tmp_path, clip_benchmark_server):
    url = clip_benchmark_server["url"]
    train = f"{url}/train-{{0..1}}.tar"
    val = f"pipe:curl -s -L {url}/val-0.tar"  # as open_clip users stream the hub's shards
    vocab = make_vocab(tmp_path, train)
    root = tmp_path / "run"
    data = ["--data.train_shards", train, "--data.val_shards", val, "--data.vocab", vocab,
            "--data.samples_per_epoch", "8", "--trainer.val_check_interval", "2"]  # fmt: skip
    first = fit(tmp_path, root, *data, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data.train_shards holds txt shards" in first.stderr and "data.val_shards holds txt shards" in first.stderr
    resumed = fit(tmp_path, root, *data, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(root / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    runs = logged(root)
    assert [series(r, "val/num_images") for r in runs] == [[IMAGES], [IMAGES]]
    assert set(samples_table_references(root)) == {CAPTIONS}
    served = clip_benchmark_server["requests"]
    assert {"/train-0.tar", "/train-1.tar", "/val-0.tar"} <= set(served), served


def test_shards_without_one_usable_sample_fail_in_one_sentence(tmp_path, img2dataset_shards):
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in range(2):
        with wds.TarWriter(str(bad / f"{s}.tar")) as writer:
            for k in range(3):
                writer.write({"__key__": f"k{s}{k}", "webp": b"RIFF....WEBPVP8 ", "txt": "a cat on a mat"})
    cases = [
        (["--data.train_shards", str(bad / "{0..1}.tar")],
         "data.train_shards has no usable sample: the first 6 samples (2 shard(s)) were all skipped (corrupt_image: 6)"),  # noqa: E501
        (["--data.train_shards", img2dataset_shards["shards"], "--data.format", "capline"],  # the report
         "(other_layout: 20); they look like img2dataset shards: set data.format: img2dataset"),
    ]  # fmt: skip
    for overrides, words in cases:
        result = fit(tmp_path, tmp_path / "run", "--data.vocab", img2dataset_shards["vocab"], *overrides)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("capline: error: ") and words in message, message
        assert not list(tmp_path.glob("run/checkpoints/*.ckpt"))  # stopped before any step
