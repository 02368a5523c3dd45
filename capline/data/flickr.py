"""Flickr8k and Flickr30k captions, and any of Karpathy's three split files, as images to write to shards.

    captions, malformed = load_flickr_captions("Flickr8k.token.txt")      # {"1000268201_693b08cb0e.jpg": [...]}
    images = flickr_images(captions, load_split_list("Flickr_8k.trainImages.txt"))
    images = load_karpathy_images("dataset_flickr8k.json", "train")        # or dataset_flickr30k/coco.json

Then `capline.data.coco.write_coco_shards(images, ...)` writes them like COCO's.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from pathlib import Path

from capline.data.coco import KARPATHY_SPLITS, CocoFormatError, CocoImage, _read_json, load_karpathy_split

# `1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ...` (Flickr8k.token.txt, results_20130124.token)
_TOKEN_LINE = re.compile(r"(?P<name>[^\t#]+\.(?:jpe?g|png))#(?P<index>\d+)\t(?P<caption>.*)", re.IGNORECASE)
_CSV_HEADER = ("image_name", "comment_number", "comment")  # Kaggle's Flickr30k results.csv, `|`-separated


def flickr_image_id(file_name: str) -> int:
    """The Flickr photo id: the file name's leading digits (`1000268201_693b08cb0e.jpg` -> 1000268201)."""
    digits = re.match(r"\d{1,18}", Path(file_name).name)
    return int(digits[0]) if digits else zlib.crc32(file_name.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF


def load_flickr_captions(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[int]]:
    """Reads a Flickr caption file: `name.jpg#i<TAB>caption` lines, or Flickr30k's `results.csv`.

    Returns:
        `{image file name: captions in file order}` and the numbers of the lines that did not parse.

    Raises:
        CocoFormatError: If the file is missing, not UTF-8, or has not one caption line.
    """
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"caption file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"caption file {str(path)!r} is not UTF-8 text ({err})") from None
    header = [cell.strip() for cell in lines[0].split("|")] if lines else []
    rows = _csv_rows(lines) if tuple(header) == _CSV_HEADER else _token_rows(lines)
    captions: dict[str, list[str]] = {}
    malformed = []
    for number, row in rows:
        if row is None:
            malformed.append(number)
        elif row[1]:
            captions.setdefault(row[0], []).append(row[1])
    if not captions:
        first = next((f"line {n}: {lines[n - 1][:60]!r}" for n in malformed), "it is empty")
        raise CocoFormatError(
            f"caption file {str(path)!r} has no line 'name.jpg#0<TAB>caption' (or results.csv's "
            f"'image_name| comment_number| comment'); {first}"
        )
    return captions, malformed


def _token_rows(lines: list[str]):
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line.rstrip("\r\n"))
        yield number, (match["name"].strip(), " ".join(match["caption"].split())) if match else None


def _csv_rows(lines: list[str]):
    for number, cells in enumerate(csv.reader(lines[1:], delimiter="|"), 2):
        if not cells:
            continue
        ok = len(cells) == 3 and cells[1].strip().isdigit() and cells[0].strip()
        yield number, (cells[0].strip(), " ".join(cells[2].split())) if ok else None


def load_split_list(path: str | os.PathLike) -> list[str]:
    """The image file names of a split list such as `Flickr_8k.trainImages.txt`, one per line."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"split file {str(path)!r} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def flickr_images(captions: dict[str, list[str]], names: list[str] | None = None) -> list[CocoImage]:
    """The images to write: those of `names` (a split list; all images by default), sorted by file name.

    A listed image without a caption is kept with none, and the shard writer counts it as skipped.
    """
    names = sorted(captions) if names is None else sorted(set(names))
    return [CocoImage(flickr_image_id(n), n, tuple(captions.get(n, ()))) for n in names]


def load_karpathy_images(path: str | os.PathLike, split: str) -> list[CocoImage]:
    """The images of one split of any of Karpathy's files: `dataset_coco.json` (`cocoid`, `filepath`) or
    `dataset_flickr8k.json` / `dataset_flickr30k.json` (`imgid`, `filename`, no folder)."""
    wanted = set(split.split("+"))
    if not wanted <= set(KARPATHY_SPLITS):
        raise ValueError(f"Karpathy split {split!r} must be one of {KARPATHY_SPLITS} or several joined by '+'")
    data = _read_json(path)
    images = data.get("images")
    if isinstance(images, list) and images and isinstance(images[0], dict) and "cocoid" in images[0]:
        return load_karpathy_split(path, split)
    try:
        return [
            CocoImage(flickr_image_id(img["filename"]), str(img["filename"]), tuple(_raw(s) for s in img["sentences"]))
            for img in images
            if img["split"] in wanted
        ]
    except (KeyError, TypeError, AttributeError):
        raise CocoFormatError(
            f"{str(path)!r} is not one of Karpathy's split files (it needs 'images', each with 'filename', 'split' "
            f"and 'sentences' with 'raw'; COCO's also 'cocoid' and 'filepath')"
        ) from None


def _raw(sentence: dict) -> str:
    return " ".join(sentence["raw"].split())
