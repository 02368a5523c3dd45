"""COCO captions (official 2014/2017 annotations, optionally Karpathy splits) written as capline shards.

`capline shards coco` is the command-line entry point; this module holds the steps:

    images = load_coco_annotations(["annotations/captions_train2014.json"])   # {image_id: CocoImage}
    report = write_coco_shards(sorted(images.values()), "coco", "out", "train", max_size=256)
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from capline.data.shards import ShardWriter, encode_jpeg

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")
_SPLIT_FOLDER = re.compile(r"(train|val|test)\d{4}")  # "captions_val2014.json" -> images in "val2014/"
_BATCH = 16  # images per task sent to a worker process: amortises the inter-process round trip
_EXAMPLES = 3  # file names kept per skip reason, to show the user


class CocoFormatError(ValueError):
    """An annotation or Karpathy split file that is missing or not in the expected format."""


@dataclass(frozen=True, order=True)
class CocoImage:
    """One image and its reference captions."""

    image_id: int
    file_name: str  # as listed: a bare name (COCO annotations) or a relative path (Karpathy "filepath/filename")
    captions: tuple[str, ...] = field(compare=False)
    folder: str | None = field(default=None, compare=False)  # subfolder suggested by the annotation file name


@dataclass
class CocoShardReport:
    """What `write_coco_shards` wrote and skipped."""

    num_shards: int = 0
    written: list[CocoImage] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason ("missing", "corrupt", "no captions") -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few file names

    def skip(self, reason: str, image: CocoImage) -> None:
        self.skipped[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < _EXAMPLES:
            names.append(image.file_name)


def load_coco_annotations(paths: Sequence[str | os.PathLike]) -> dict[int, CocoImage]:
    """Reads official COCO caption annotation files (`images` + `annotations`) into images with captions.

    Args:
        paths: One or more `captions_*.json` files, e.g. train2014 and val2014 for the Karpathy splits.

    Returns:
        `{image_id: CocoImage}`; images without captions are kept with an empty caption tuple.

    Raises:
        CocoFormatError: If a file is missing, not JSON, or lacks the COCO fields.
    """
    images: dict[int, CocoImage] = {}
    for path in paths:
        data = _read_json(path)
        try:
            captions: dict[int, list[str]] = {int(img["id"]): [] for img in data["images"]}
            for ann in data["annotations"]:
                captions.setdefault(int(ann["image_id"]), []).append(_clean(ann["caption"]))
            match = _SPLIT_FOLDER.search(Path(path).stem)
            for img in data["images"]:
                image_id = int(img["id"])
                images[image_id] = CocoImage(
                    image_id, str(img["file_name"]), tuple(captions[image_id]), match[0] if match else None
                )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CocoFormatError(
                f"{str(path)!r} is not a COCO captions file (it needs 'images' with 'id' and "
                f"'file_name', and 'annotations' with 'image_id' and 'caption')"
            ) from None
    return images


def load_karpathy_split(path: str | os.PathLike, split: str) -> list[CocoImage]:
    """Reads the images of one Karpathy split (`dataset_coco.json`), in file order.

    Args:
        path: The Karpathy split file: `{"images": [{"cocoid", "filepath", "filename", "split", "sentences"}]}`.
        split: "train", "val", "test", "restval", or several joined by "+", e.g. "train+restval".

    Returns:
        The selected images with the Karpathy file's raw sentences as captions.
    """
    wanted = set(split.split("+"))
    if not wanted <= set(KARPATHY_SPLITS):
        raise ValueError(f"Karpathy split {split!r} must be one of {KARPATHY_SPLITS} or several joined by '+'")
    data = _read_json(path)
    try:
        return [
            CocoImage(
                int(img["cocoid"]),
                f"{img['filepath']}/{img['filename']}",
                tuple(_clean(s["raw"]) for s in img["sentences"]),
                str(img["filepath"]),
            )
            for img in data["images"]
            if img["split"] in wanted
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CocoFormatError(
            f"{str(path)!r} is not a Karpathy split file (it needs 'images' with 'cocoid', "
            f"'filepath', 'filename', 'split' and 'sentences')"
        ) from None


def select_images(annotations: dict[int, CocoImage], karpathy: list[CocoImage] | None) -> list[CocoImage]:
    """Returns the images to write, sorted by id so that the output does not depend on file order.

    With a Karpathy split, its images are kept and take their captions from the official annotations where
    those list the image (the same sentences, as the official scorer sees them), else from the Karpathy file.
    """
    if karpathy is None:
        return sorted(annotations.values())
    return sorted(annotations.get(img.image_id, img) for img in karpathy)


def write_coco_shards(
    images: Sequence[CocoImage],
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str,
    max_size: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
) -> CocoShardReport:
    """Writes `images` as shards `out_dir/<split>-NNNNNN.tar`, skipping missing and unreadable files.

    Args:
        images: The images to write, in output order.
        root: Image folder: files are looked up in it and in its subfolders (`train2014/`, `val2017/`, ...).
        out_dir: Output folder.
        split: Split name used for the shard names.
        max_size: If given, images whose short side is larger are resized to it and re-encoded as JPEG;
            otherwise the original JPEG/PNG bytes are stored as they are.
        shard_size: Samples per shard.
        workers: Processes that decode, resize and encode; the output is the same for any number.
        progress: Show a tqdm progress bar.

    Returns:
        The report: shards written, images written, skip counts and examples.
    """
    report = CocoShardReport()
    captioned = []
    for img in images:
        if img.captions:
            captioned.append(img)
        else:
            report.skip("no captions", img)
    files = _index_image_files(Path(root))
    paths = [_resolve(Path(root), img, files) for img in captioned]
    tasks = [(paths[i : i + _BATCH], max_size) for i in range(0, len(paths), _BATCH)]
    results = (r for batch in _ordered_map(_encode_batch, tasks, workers) for r in batch)
    with ShardWriter(out_dir, split, shard_size) as writer:
        for img, (status, data, ext) in tqdm(
            zip(captioned, results), total=len(captioned), disable=not progress, desc=f"shards {split}", unit="img"
        ):
            if status != "ok":
                report.skip(status, img)
                continue
            meta = {"image_id": img.image_id, "captions": list(img.captions)}
            writer.write((f"{img.image_id:012d}", data, ext, meta))
            report.written.append(img)
    report.num_shards = len(writer.index["shards"])
    for reason, count in sorted(report.skipped.items()):
        log.warning("skipped %d images (%s), e.g. %s", count, reason, ", ".join(report.examples[reason]))
    return report


def encode_image(data: bytes, max_size: int | None) -> tuple[bytes, str]:
    """Returns the bytes to store for one image file and their extension ("jpg" or "png").

    JPEG and PNG files are kept byte for byte unless they must shrink; anything else is re-encoded as JPEG.

    Raises:
        OSError: If the image cannot be decoded (PIL's errors for corrupt or truncated files).
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if max_size is None or min(width, height) <= max_size:
            # Decoding at 1/8 scale still reads every entropy-coded byte, so truncated files fail here, cheaply.
            img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.load()
            if img.format in ("JPEG", "PNG"):
                return data, "jpg" if img.format == "JPEG" else "png"
            return encode_jpeg(img.convert("RGB")), "jpg"
        scale = max_size / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img.draft("RGB", size)  # JPEG: decode at the smallest power-of-two reduction still >= `size`
        return encode_jpeg(img.convert("RGB").resize(size, Image.Resampling.BICUBIC)), "jpg"


def _encode_batch(task: tuple[list[Path | None], int | None]) -> list[tuple[str, bytes | None, str | None]]:
    """Worker: `(status, data, ext)` per path, status "ok", "missing" or "corrupt"."""
    paths, max_size = task
    results = []
    for path in paths:
        try:
            if path is None:
                raise FileNotFoundError
            data, ext = encode_image(path.read_bytes(), max_size)
            results.append(("ok", data, ext))
        except FileNotFoundError:
            results.append(("missing", None, None))
        # One undecodable file must cost one sample, not an hours-long run: PIL raises many exception types.
        except Exception as err:  # noqa: BLE001
            log.debug("cannot decode %s: %r", path, err)
            results.append(("corrupt", None, None))
    return results


def _ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """`map(fn, tasks)` over `workers` processes, in order, with a bounded number of tasks in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    pool = ProcessPoolExecutor(workers)
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 4 * workers:  # keeps memory flat when one slow task holds up the queue
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _index_image_files(root: Path) -> dict[str, list[Path]]:
    """Maps each file name in `root` and its direct subfolders to its paths (one listing, not a stat per image)."""
    files: dict[str, list[Path]] = {}
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    files.setdefault(entry.name, []).append(Path(entry.path))
    return files


def _resolve(root: Path, img: CocoImage, files: dict[str, list[Path]]) -> Path | None:
    """Finds an image file: the listed path under `root`, else by name, preferring the suggested subfolder."""
    direct = root / img.file_name
    candidates = files.get(Path(img.file_name).name, [])
    if direct in candidates or (len(Path(img.file_name).parts) > 1 and direct.is_file()):
        return direct
    preferred = [p for p in candidates if p.parent.name == img.folder]
    return (preferred or candidates or [None])[0]


def _read_json(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise CocoFormatError(f"file {str(path)!r} does not exist")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"file {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"file {str(path)!r} must hold a JSON object")
    return data


def _clean(caption: str) -> str:
    """Collapses the stray spaces and newlines found in COCO captions."""
    return " ".join(caption.split())
