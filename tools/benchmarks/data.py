"""Data pipeline: the real training dataloader against bare PIL decode of the same JPEGs, same worker count.

    python -m tools.benchmarks.data            # 1,000 COCO-like 640x480 JPEGs read 3 times, best of 5 rounds
    python -m tools.benchmarks.data --quick    # read twice, best of 3

The loader is `CaptionDataModule.train_dataloader()` over shards on local disk (TrainStream -> decode with
`Image.draft` -> `ImageTransform` for resnet50's timm data config -> `CaptionBatcher`). The limit is a
`multiprocessing.Pool` of as many processes doing only what must be done to the same JPEG bytes: open, draft,
resize the centre-crop box to 224 x 224, to a uint8 array. Both are timed at steady state (worker start-up and the
first batch of each worker excluded), repeats of the two interleaved, best of the repeats.

The images are generated, not downloaded: low-frequency colour fields, blurred shapes and sensor-like noise,
JPEG quality 90, so that their entropy-coded size and decode time are in the range of COCO's photos. They are
written once per machine under the temp folder and reused.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw, ImageFilter

from capline.data.coco import encode_image
from capline.data.datamodule import CaptionDataModule
from capline.data.shards import ShardWriter, index_path, shard_pattern
from capline.vocab import Vocabulary
from tools.benchmarks import main
from tools.benchmarks import row as _row

WIDTH, HEIGHT, QUALITY = 640, 480, 90  # COCO's typical photo
PRE_RESIZE = 256  # the short side of `capline shards --max-size 256`
BATCH_SIZE, SHARD_SIZE = 64, 100
ENCODER = "resnet50"  # its timm data config: 224 px, crop_pct 0.95, bicubic
WORDS = "a man woman dog cat sits stands on the in of with red blue small large table street field near".split()
CACHE_VERSION = 1  # bump when the generated images change


def make_photo(index: int) -> bytes:
    """A 640x480 JPEG with photo-like statistics (smooth fields, edges, noise); depends only on `index`."""
    rng = np.random.default_rng(index)
    image = np.full((HEIGHT, WIDTH, 3), rng.uniform(60, 180, 3), dtype=np.float32)
    for cells, amplitude in ((3, 90.0), (9, 40.0), (27, 18.0)):  # octaves of upsampled noise
        small = rng.standard_normal((3, cells * HEIGHT // WIDTH + 2, cells + 2)).astype(np.float32)
        for c in range(3):
            image[..., c] += amplitude * np.asarray(Image.fromarray(small[c]).resize((WIDTH, HEIGHT), Image.BILINEAR))
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(4, 12)):
        x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
        box = (x, y, x + rng.integers(20, 300), y + rng.integers(20, 250))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.int16)
    pixels += rng.integers(-30, 31, pixels.shape, dtype=np.int16)  # grain: ~140 KB per JPEG, near COCO's average
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def _caption(index: int) -> str:
    rng = np.random.default_rng(10_000_000 + index)
    return " ".join(rng.choice(WORDS, rng.integers(8, 15)))


def make_pre_resized_photo(index: int) -> bytes:
    """`make_photo(index)` as `capline shards --max-size 256` stores it."""
    return encode_image(make_photo(index), PRE_RESIZE)[0]


def prepare_shards(num_images: int, root: Path | None = None) -> dict:
    """Writes (or reuses) the raw and the pre-resized split and the vocabulary; returns their paths and sizes."""
    root = root or Path(tempfile.gettempdir()) / f"capline-bench-data-v{CACHE_VERSION}-{num_images}"
    root.mkdir(parents=True, exist_ok=True)
    splits = {"raw": make_photo, "pre256": make_pre_resized_photo}
    info = {"vocab": str(root / "vocab.json")}
    with FileLock(str(root / ".generate.lock")):  # another run on the machine may be writing them now
        if not Path(info["vocab"]).is_file():
            Vocabulary.build([" ".join(WORDS)], min_count=1).save(info["vocab"])
        for split, make in splits.items():
            if index_path(root, split).is_file():  # ShardWriter writes the index last: present means complete
                continue
            with multiprocessing.get_context("fork").Pool() as pool, ShardWriter(root, split, SHARD_SIZE) as writer:
                for i, data in enumerate(pool.imap(make, range(num_images), chunksize=16)):
                    writer.write((f"{i:08d}", data, "jpg", {"image_id": i, "captions": [_caption(i)]}))
    for split in splits:
        index = json.loads(index_path(root, split).read_text())
        shards = len(index["shards"])
        info[split] = {
            "pattern": shard_pattern(root, split, shards),
            "kb_per_image": sum((root / s["name"]).stat().st_size for s in index["shards"]) / num_images / 1024,
        }
    return info


def loader_rate(pattern: str, vocab: str, data_config: dict, workers: int, samples: int) -> float:
    """Images/s of the training dataloader over an epoch of `samples` (each worker's first batch excluded)."""
    data = CaptionDataModule(
        train_shards=pattern, vocab=vocab, global_batch_size=BATCH_SIZE, num_workers=workers, samples_per_epoch=samples
    )
    data.image_config = data_config
    data.setup("fit")
    stamps, images = [], []
    for batch in data.train_dataloader():
        stamps.append(time.perf_counter())
        images.append(batch["images"].shape[0])
    skip = max(1, workers)  # a batch arriving at stamps[i] was produced during (stamps[i-1], stamps[i]]
    return sum(images[skip + 1 :]) / (stamps[-1] - stamps[skip])


_JPEGS: list[bytes] = []  # the bytes the decode pool reads, inherited by forked workers


def _decode_limit_chunk(task: tuple[int, int, int, int, int]) -> int:
    start, stop, size, resize_to, resample = task
    for data in _JPEGS[start:stop]:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (resize_to, resize_to))
        w, h = img.size
        scale = resize_to / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        box = (left * w / new_w, top * h / new_h, (left + size) * w / new_w, (top + size) * h / new_h)
        np.asarray(img.convert("RGB").resize((size, size), resample, box=box), dtype=np.uint8)
    return stop - start


def decode_limit_rate(jpegs: list[bytes], data_config: dict, workers: int, passes: int = 1) -> float:
    """Images/s of bare PIL decode + resize + centre crop of `jpegs`, `passes` times, in a pool of `workers`."""
    size = int(data_config["input_size"][-1])
    resize_to = int(np.floor(size / data_config["crop_pct"]))
    resample = Image.Resampling[data_config["interpolation"].upper()]
    _JPEGS[:] = jpegs
    tasks = [(i, min(i + BATCH_SIZE, len(jpegs)), size, resize_to, resample) for i in range(0, len(jpegs), BATCH_SIZE)]
    tasks *= passes
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_limit_chunk, tasks[:workers], chunksize=1)  # start-up and first-call costs, untimed
        start = time.perf_counter()
        done = sum(pool.map(_decode_limit_chunk, tasks, chunksize=1))
        return done / (time.perf_counter() - start)


def read_jpegs(pattern: str) -> list[bytes]:
    import webdataset as wds

    urls = wds.shardlists.expand_urls(pattern)
    return [s["jpg"] for s in wds.tariterators.tarfile_samples([{"url": u} for u in urls])]


def measure_all(info: dict, data_config: dict, worker_counts: tuple[int, ...], repeats: int, passes: int) -> dict:
    """Best images/s of `("loader" | "limit", split, workers)` over `repeats` interleaved rounds, each reading
    the images `passes` times (a long steady state: worker start-up is not what is measured)."""
    jpegs = {split: read_jpegs(info[split]["pattern"]) for split in ("raw", "pre256")}
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(repeats):  # interleaved, so a burst of load on the shared machine hits both sides alike
        for split in ("raw", "pre256"):
            for workers in worker_counts:
                rates = {
                    "loader": loader_rate(
                        info[split]["pattern"], info["vocab"], data_config, workers, passes * len(jpegs[split])
                    ),
                    "limit": decode_limit_rate(jpegs[split], data_config, workers, passes),
                }
                for kind, rate in rates.items():
                    best[kind, split, workers] = max(best.get((kind, split, workers), 0.0), rate)
    return best


def run(quick: bool = False, num_images: int | None = None, worker_counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Loader/limit ratios for each worker count, and what pre-resizing the shards to 256 px buys."""
    from capline.models import TimmEncoder

    info = prepare_shards(num_images or 1000)
    best = measure_all(info, TimmEncoder(ENCODER).data_config, worker_counts, 3 if quick else 5, 2 if quick else 3)
    rows = []
    for workers in worker_counts:
        ratio = best["loader", "raw", workers] / best["limit", "raw", workers]
        rows.append(_row(f"data_loader_vs_decode_limit_{workers}w", ratio, 0.9, ratio >= 0.9))
    for split in ("raw", "pre256"):
        for workers in worker_counts:
            rows.append(_row(f"data_loader_img_s_{split}_{workers}w", best["loader", split, workers]))
            rows.append(_row(f"data_decode_limit_img_s_{split}_{workers}w", best["limit", split, workers]))
    for workers in worker_counts:
        ratio = best["loader", "pre256", workers] / best["limit", "pre256", workers]
        rows.append(_row(f"data_loader_vs_decode_limit_pre256_{workers}w", ratio))
        speedup = best["loader", "pre256", workers] / best["loader", "raw", workers]
        rows.append(_row(f"data_pre256_vs_raw_loader_speedup_{workers}w", speedup))
    for split in ("raw", "pre256"):
        rows.append(_row(f"data_shard_kb_per_image_{split}", info[split]["kb_per_image"]))
    return rows


if __name__ == "__main__":
    main(__doc__, run, "each timing reads the images twice, best of 3")
