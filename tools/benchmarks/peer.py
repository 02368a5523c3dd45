"""capline's training loader against the webdataset pipeline open_clip builds, same shards, workers and cores.

    python -m tools.benchmarks.peer            # 1,000 640x480 JPEGs per layout read 3 times, best of 5 rounds
    python -m tools.benchmarks.peer --quick    # read twice, best of 3

The peer is open_clip's training pipeline (`open_clip_train/data.py`, `get_wds_dataset`) reduced to its data path:
`WebDataset(urls).shuffle(1000).decode("pilrgb").rename(image=..., text=...).map_dict(image=preprocess)
.to_tuple("image", "text").batched(64)` in a `WebLoader(batch_size=None, num_workers=w)`, `preprocess` being
torchvision's Resize (bicubic, to the short side timm's data config gives resnet50) + CenterCrop(224) + ToTensor
+ Normalize. Its text is left as it is (open_clip would tokenize it: more work for the peer, not less).

Three layouts of the same images: capline's raw shards and `capline shards --max-size 256` shards (from
`tools.benchmarks.data`), and the raw images in img2dataset's layout (`.jpg`, `.txt`, `.json` with url, key,
status, sizes). capline's loader reads each with `data.format: auto`. Both sides are timed at steady state (each
worker's first batch excluded), interleaved, best of the repeats; the value is capline's images/s over the peer's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import webdataset as wds
from filelock import FileLock

from tools.benchmarks import main
from tools.benchmarks import row as _row
from tools.benchmarks.data import BATCH_SIZE, ENCODER, SHARD_SIZE, _caption, loader_rate, prepare_shards, read_jpegs

GOAL = 2.0  # capline's loader at least twice the peer's images/s, on every layout
LAYOUTS = ("raw", "pre256", "img2dataset")


def prepare_img2dataset_shards(info: dict, num_images: int) -> str:
    """The raw split's images written again in img2dataset's layout (one caption per image); returns the pattern."""
    root = Path(info["raw"]["pattern"]).parent
    folder = root / "img2dataset"
    folder.mkdir(exist_ok=True)
    shards = (num_images + SHARD_SIZE - 1) // SHARD_SIZE
    with FileLock(str(root / ".img2dataset.lock")):
        if not (folder / "done").is_file():
            for shard in range(shards):
                with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
                    for i in range(shard * SHARD_SIZE, min(num_images, (shard + 1) * SHARD_SIZE)):
                        key = f"{i:09d}"
                        meta = {"caption": _caption(i), "url": f"http://example.org/{key}.jpg", "key": key,
                                "status": "success", "width": 640, "height": 480}  # fmt: skip
                        writer.write({"__key__": key, "txt": _caption(i), "json": meta, "jpg": info["jpegs"][i]})
            (folder / "done").write_text("")
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def peer_rate(pattern: str, data_config: dict, workers: int, passes: int) -> float:
    """Images/s of open_clip's webdataset pipeline over `passes` readings of the shards."""
    import torchvision.transforms as T

    size = int(data_config["input_size"][-1])
    preprocess = T.Compose([
        T.Resize(int(np.floor(size / data_config["crop_pct"])), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(data_config["mean"], data_config["std"]),
    ])  # fmt: skip
    urls = wds.shardlists.expand_urls(pattern) * passes
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
        .shuffle(1000)
        .decode("pilrgb")
        .rename(image="jpg;png;jpeg;webp", text="txt;json")
        .map_dict(image=preprocess)
        .to_tuple("image", "text")
        .batched(BATCH_SIZE)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    stamps, images = [], []
    for batch in loader:
        stamps.append(time.perf_counter())
        images.append(batch[0].shape[0])
    skip = max(1, workers)
    return sum(images[skip + 1 :]) / (stamps[-1] - stamps[skip])


def run(quick: bool = False, num_images: int | None = None, worker_counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    from capline.models import TimmEncoder

    num_images = num_images or 1000
    info = prepare_shards(num_images)
    info["jpegs"] = read_jpegs(info["raw"]["pattern"])
    patterns = {"raw": info["raw"]["pattern"], "pre256": info["pre256"]["pattern"]}
    patterns["img2dataset"] = prepare_img2dataset_shards(info, num_images)
    data_config = TimmEncoder(ENCODER).data_config
    repeats, passes = (3, 2) if quick else (5, 3)
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(repeats):  # interleaved, so a burst of load on the shared machine hits both sides alike
        for layout in LAYOUTS:
            for workers in worker_counts:
                rates = {
                    "capline": loader_rate(patterns[layout], info["vocab"], data_config, workers, passes * num_images),
                    "peer": peer_rate(patterns[layout], data_config, workers, passes),
                }
                for side, rate in rates.items():
                    best[side, layout, workers] = max(best.get((side, layout, workers), 0.0), rate)
    rows = []
    for layout in LAYOUTS:
        for workers in worker_counts:
            ratio = best["capline", layout, workers] / best["peer", layout, workers]
            rows.append(_row(f"peer_capline_vs_open_clip_{layout}_{workers}w", ratio, GOAL, ratio >= GOAL))
    for layout in LAYOUTS:
        for workers in worker_counts:
            rows.append(_row(f"peer_capline_img_s_{layout}_{workers}w", best["capline", layout, workers]))
            rows.append(_row(f"peer_open_clip_img_s_{layout}_{workers}w", best["peer", layout, workers]))
    return rows


if __name__ == "__main__":
    main(__doc__, run, "each timing reads the images twice, best of 3")
