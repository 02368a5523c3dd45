"""Writing and indexing the WebDataset shards that capline trains on.

Every shard holds samples `<key>.jpg` (or `<key>.png`) + `<key>.json`, the JSON being
`{"image_id": ..., "captions": [str, ...]}` with all reference captions of the image. A split's shards are named
`<split>-000000.tar`, `<split>-000001.tar`, ... and are described by `<split>-index.json`:

    {"split": "train", "shards": [{"name": "train-000000.tar", "num_samples": 500}, ...], "num_samples": 8000}

The index is written last, so a split without one is incomplete and must not be trusted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import NamedTuple

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "png")
_SHARD_DIGITS = 6
# webdataset splits a member name into key and extension at the first dot, and `/` would make a folder.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+-]+")
# A fixed member mtime makes the same samples give byte-identical shards (reproducible datasets, cheap diffs).
_MEMBER_MTIME = 0


class ShardIndexError(ValueError):
    """A split index that is missing or malformed."""


class ShardSample(NamedTuple):
    """One sample to write: a plain `(key, image_bytes, ext, meta)` tuple works as well."""

    key: str  # unique within the split; letters, digits, `_`, `+`, `-` only (no dots)
    image: bytes  # encoded image, written as is
    ext: str  # "jpg" or "png"
    meta: dict  # {"image_id": ..., "captions": [...]}


def shard_name(split: str, shard_index: int) -> str:
    """Returns the file name of shard `shard_index` of `split`, e.g. `train-000003.tar`."""
    return f"{split}-{shard_index:0{_SHARD_DIGITS}d}.tar"


def index_path(out_dir: str | os.PathLike, split: str) -> Path:
    """Returns the path of the index of `split` in `out_dir`."""
    return Path(out_dir) / f"{split}-index.json"


def shard_pattern(out_dir: str | os.PathLike, split: str, num_shards: int) -> str:
    """Returns the brace pattern webdataset expands to the shards of a split.

    Args:
        out_dir: Folder holding the shards.
        split: Split name, e.g. "train".
        num_shards: Number of shards, at least 1.

    Returns:
        For example `out/train-{000000..000003}.tar` for four shards.
    """
    if num_shards < 1:
        raise ValueError(f"a shard pattern needs at least one shard, got num_shards={num_shards}")
    last = f"{num_shards - 1:0{_SHARD_DIGITS}d}"
    return os.path.join(os.fspath(out_dir), f"{split}-{{{0:0{_SHARD_DIGITS}d}..{last}}}.tar")


def read_index(path: str | os.PathLike) -> dict:
    """Reads and checks a split index written by `ShardWriter`.

    Args:
        path: Path of `<split>-index.json`.

    Returns:
        The index: `{"split": str, "shards": [{"name": str, "num_samples": int}, ...], "num_samples": int}`.

    Raises:
        ShardIndexError: If the file is missing, not JSON, or its counts do not add up.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardIndexError(f"shard index {str(path)!r} does not exist; write the shards with capline shards")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        counts = [int(s["num_samples"]) for s in index["shards"]]
        names = [str(s["name"]) for s in index["shards"]]
        total, split = int(index["num_samples"]), str(index["split"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ShardIndexError(f"shard index {str(path)!r} is malformed ({err!r})") from None
    if sum(counts) != total or names != [shard_name(split, i) for i in range(len(names))]:
        raise ShardIndexError(f"shard index {str(path)!r} is inconsistent: its shard names or counts do not add up")
    return index


def encode_jpeg(image: Image.Image, quality: int = 90, full_chroma: bool = False) -> bytes:
    """Encodes an image as JPEG bytes.

    Args:
        image: An RGB or L image.
        quality: JPEG quality.
        full_chroma: Keep colour at full resolution (4:4:4); worth it for tiny images whose small objects would
            otherwise bleed colour into the background, not for photos.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0 if full_chroma else -1)
    return buffer.getvalue()


class ShardWriter:
    """Writes the samples of one split into shards of `shard_size` samples, each shard atomically.

    A shard is written under a temporary name and renamed when complete; the index is written once all shards are
    done. Creating a writer deletes the split's old index and leftover temporary shards, and closing it deletes
    old shards past the new last one, so a rewritten split never mixes with an earlier one. One writer per split
    and folder at a time.

    Use it as a context manager: an exception inside the block removes the unfinished shard and writes no index.

        with ShardWriter(out_dir, "train", shard_size=500) as writer:
            for key, image_bytes, ext, meta in samples:
                writer.write((key, image_bytes, ext, meta))
        print(writer.index["num_samples"])
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, shard_size: int = 500):
        if not _SAFE_NAME.fullmatch(split):
            raise ValueError(f"split name {split!r} must use only letters, digits, '_', '+' and '-'")
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index: dict | None = None  # set by close()
        self._shards: list[dict] = []
        self._keys: set[str] = set()
        self._file = self._tar = None
        self._in_shard = 0
        self._remove_old(keep_shards=None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return sum(s["num_samples"] for s in self._shards) + self._in_shard

    def write(self, sample: ShardSample | tuple) -> None:
        """Adds one `(key, image_bytes, ext, meta)` sample, starting a new shard when the current one is full."""
        key, image, ext, meta = sample
        ext = "jpg" if ext == "jpeg" else ext
        if not _SAFE_NAME.fullmatch(key):
            raise ValueError(f"sample key {key!r} must use only letters, digits, '_', '+' and '-' (no dots)")
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension {ext!r} is not one of {IMAGE_EXTENSIONS}")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written to split {self.split!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open_shard()
        self._add_member(f"{key}.{ext}", image)
        self._add_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish_shard()

    def close(self) -> dict:
        """Finishes the last shard, removes stale shards, writes the index and returns it."""
        if self.index is not None:
            return self.index
        if self._tar is not None:
            self._finish_shard()
        self._remove_old(keep_shards=len(self._shards))
        self.index = {"split": self.split, "shards": self._shards, "num_samples": self.num_samples}
        path = index_path(self.out_dir, self.split)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.index, indent=1))
        os.replace(tmp, path)
        log.info(
            "wrote %d samples of split %r in %d shards to %s",
            self.num_samples,
            self.split,
            len(self._shards),
            self.out_dir,
        )
        return self.index

    def abort(self) -> None:
        """Drops the unfinished shard; the split keeps no index and so reads as incomplete."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._file = self._tar = None

    def _open_shard(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self._shards))
        self._file = open(path.with_name(path.name + ".tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        name = shard_name(self.split, len(self._shards))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename below must not publish a shard still in the page cache only
        self._file.close()
        os.replace(self._file.name, self.out_dir / name)
        self._shards.append({"name": name, "num_samples": self._in_shard})
        self._file = self._tar = None
        self._in_shard = 0

    def _remove_old(self, keep_shards: int | None) -> None:
        """Removes the index and temporary shards of this split, or (with `keep_shards`) shards past the last."""
        own = re.compile(rf"{re.escape(self.split)}-(\d{{{_SHARD_DIGITS}}})\.tar(\.tmp)?")
        if keep_shards is None:
            index_path(self.out_dir, self.split).unlink(missing_ok=True)
        for path in self.out_dir.iterdir():
            match = own.fullmatch(path.name)
            if match is None:
                continue
            stale = bool(match[2]) if keep_shards is None else not match[2] and int(match[1]) >= keep_shards
            if stale:
                log.debug("removing stale %s", path)
                path.unlink(missing_ok=True)
