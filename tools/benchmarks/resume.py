"""Resume start-up: time from building the training loader to its first batch, resuming at 10% and at 90% of an
epoch of 100,000 samples; and the shuffle quality of the elastic order against the order before it.

    python -m tools.benchmarks.resume            # best of 5 of each
    python -m tools.benchmarks.resume --quick    # best of 3

The loader is `CaptionDataModule.train_dataloader()` with 2 workers and a global batch of 64, positioned by
`load_state_dict` as a checkpoint does, over 100 local shards of 1,000 samples (a 64 px JPEG of ~3 KB and its
captions each; written once per machine under the temp folder). Each lane reads the block it is in, so the time
should not depend on where in the epoch the run resumes. The baseline is what resuming cost before the elastic
order: re-reading every consumed sample from the tar files without decoding it, shared by the same 2 worker
processes (`replay`).

Shuffle quality, over the same 100 x 1,000 samples, global batch 64, `shuffle_buffer` 1000: the Spearman
correlation between a sample's position in the shards (as written) and in the epoch; the same within each shard
(its offset in the shard against its position in the epoch), averaged over the shards; and the distinct shards
in a global batch, on average. The order before is rebuilt here as it was: the shards in a (seed, epoch) order
dealt to 2 workers, each reading its shards through a 1,000-sample shuffle buffer and making whole batches in turn.
"""

from __future__ import annotations

import io
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from capline.data.datamodule import CaptionDataModule
from capline.data.decode import SkipCounter
from capline.data.elastic import ElasticOrder, stable_seed
from capline.data.pipeline import _Stream
from capline.data.shards import ShardWriter, index_path, shard_pattern
from capline.vocab import Vocabulary
from tools.benchmarks import main
from tools.benchmarks import row as _row

SAMPLES, SHARD_SIZE, BATCH_SIZE, WORKERS = 100_000, 1000, 64, 2
IMAGE_CONFIG = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bilinear"}
CACHE_VERSION = 1  # bump when the shards change


def prepare_shards(root: Path | None = None) -> dict:
    """Writes (or reuses) 100 shards of 1,000 samples and a vocabulary; returns their pattern and paths."""
    root = root or Path(tempfile.gettempdir()) / f"capline-bench-resume-v{CACHE_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.json"
    with FileLock(str(root / ".generate.lock")):
        if not index_path(root, "train").is_file():  # written last: present means complete
            Vocabulary.build(["a red circle left of a blue square"], min_count=1).save(vocab)
            pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).resize((64, 64)).save(buffer, "JPEG", quality=75)
            jpeg = buffer.getvalue()
            with ShardWriter(root, "train", SHARD_SIZE) as writer:
                for i in range(SAMPLES):
                    writer.write((f"{i:08d}", jpeg, "jpg", {"image_id": i, "captions": ["a red circle"]}))
    return {"pattern": shard_pattern(root, "train", SAMPLES // SHARD_SIZE), "vocab": str(vocab), "root": root}


def startup_seconds(shards: dict, batches: int) -> float:
    """Seconds from building the training loader, resumed after `batches` batches, to its first batch."""
    data = CaptionDataModule(
        train_shards=shards["pattern"], vocab=shards["vocab"], global_batch_size=BATCH_SIZE, num_workers=WORKERS
    )
    data.image_config = IMAGE_CONFIG
    data.setup("fit")
    data.load_state_dict({"epoch": 0, "batches": batches, "global_batch_size": BATCH_SIZE})
    start = time.perf_counter()
    next(iter(data.train_dataloader()))
    return time.perf_counter() - start


def _replay_part(task: tuple[list[str], int]) -> int:
    urls, samples = task
    counter, read = SkipCounter(), 0
    for url in urls:
        for _ in _Stream._read_shard(url, counter):
            read += 1
            if read == samples:
                return read
    return read


def replay_seconds(shards: dict, batches: int) -> float:
    """Seconds to re-read the samples of `batches` batches without decoding them, shared by 2 processes (each
    reading its half of the shards in turn), as resuming did before."""
    import webdataset as wds

    urls = wds.shardlists.expand_urls(shards["pattern"])
    tasks = [(urls[w::WORKERS], batches * BATCH_SIZE // WORKERS) for w in range(WORKERS)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(_replay_part, tasks, chunksize=1)
    return time.perf_counter() - start


def elastic_epoch(counts: tuple[int, ...], buffer: int = 1000) -> list[tuple[int, int]]:
    """The elastic order's epoch 0 as (shard, index in shard), batch after batch."""
    order = ElasticOrder(counts, BATCH_SIZE, sum(counts) // BATCH_SIZE, block=-(-buffer // BATCH_SIZE))
    locate = order.locator(0)
    return [locate(p) for batch in order.global_batches(0) for p in batch]


def before_epoch(counts: tuple[int, ...], buffer: int = 1000, workers: int = WORKERS) -> list[tuple[int, int]]:
    """The order before the elastic one, 1 rank x `workers` workers, epoch 0, seed 0 (see the module's doc)."""
    import random

    import webdataset as wds

    shards = random.Random(stable_seed(0, 0)).sample(range(len(counts)), len(counts))
    streams = []
    for slot in range(workers):
        mine = random.Random(stable_seed(0, 0, slot, 0)).sample(shards[slot::workers], len(shards[slot::workers]))
        samples = ((s, i) for s in mine for i in range(counts[s]))
        rng = random.Random(stable_seed(0, 0, slot, 0, "shuffle"))
        streams.append(wds.filters._shuffle(samples, buffer, rng=rng))
    epoch = []
    for batch in range(sum(counts) // BATCH_SIZE):
        epoch += [next(streams[batch % workers]) for _ in range(BATCH_SIZE)]
    return epoch


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two sequences without ties."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def shuffle_quality(epoch: list[tuple[int, int]], counts: tuple[int, ...]) -> dict[str, float]:
    """Correlation with the written order, overall and within shards, and distinct shards per global batch."""
    starts = np.cumsum((0, *counts))
    written = np.array([starts[s] + i for s, i in epoch])
    shard = np.array([s for s, _ in epoch])
    position = np.arange(len(epoch))
    within = [spearman(written[shard == s], position[shard == s]) for s in range(len(counts)) if counts[s] > 1]
    batches = shard[: len(shard) // BATCH_SIZE * BATCH_SIZE].reshape(-1, BATCH_SIZE)
    return {
        "corr": spearman(written, position),
        "within_shard_corr": float(np.mean(within)),
        "shards_per_batch": float(np.mean([len(set(b)) for b in batches])),
    }


def run(quick: bool = False) -> list[dict]:
    """Start-up at 10% and 90% of the epoch, their ratio (goal <= 1.2), and the replay baseline at 90%."""
    shards = prepare_shards()
    epoch = SAMPLES // BATCH_SIZE
    at = {"10pct": epoch // 10, "90pct": epoch * 9 // 10}
    best: dict[str, float] = {}
    for _ in range(3 if quick else 5):  # interleaved, so a burst of load hits every figure alike
        for name, batches in at.items():
            best[name] = min(best.get(name, float("inf")), startup_seconds(shards, batches))
        best["replay"] = min(best.get("replay", float("inf")), replay_seconds(shards, at["90pct"]))
    ratio = best["90pct"] / best["10pct"]
    counts = (SHARD_SIZE,) * (SAMPLES // SHARD_SIZE)
    quality = {"elastic": shuffle_quality(elastic_epoch(counts), counts),
               "before": shuffle_quality(before_epoch(counts), counts)}  # fmt: skip
    return [
        *(
            _row(f"order_{k}_{name}", v)
            for k in ("corr", "within_shard_corr", "shards_per_batch")
            for name, figures in quality.items()
            for v in [figures[k]]
        ),
        _row("resume_startup_s_at_10pct", best["10pct"]),
        _row("resume_startup_s_at_90pct", best["90pct"]),
        _row("resume_startup_90pct_vs_10pct", ratio, 1.2, ratio <= 1.2),
        _row("resume_replay_s_at_90pct_before", best["replay"]),
        _row("resume_startup_90pct_vs_replay_before", best["90pct"] / best["replay"]),
    ]


if __name__ == "__main__":
    main(__doc__, run, "best of 3 instead of 5")
