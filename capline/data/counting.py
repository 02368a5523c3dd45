"""How many samples a shard list holds, without decoding it: the training epoch is measured in samples.

For each shard, the first source that knows wins: capline's `<split>-index.json` (written by its shard writer),
`capline-counts.json` (written by `capline shards index` for shards made elsewhere), img2dataset's
`NNNNN_stats.json` beside `NNNNN.tar`, and, for a local shard, its tar headers (read, not its members' data).
Remote shards are counted only from an index; else `data.samples_per_epoch` must say it.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

COUNTS_FILE = "capline-counts.json"  # {"shards": [{"name": "00000.tar", "num_samples": 10000}, ...]}
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7", b"S")  # tarfile's regular types: "0", NUL (old tars), contiguous, GNU sparse
# Every type flag tarfile knows; a member of another type is read as a regular file's data (as tarfile does).
_KNOWN = (*_REGULAR, b"1", b"2", b"3", b"4", b"5", b"6", b"x", b"X", b"g", b"L", b"K")


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine, or None for a remote URL or `pipe:` command."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def _sample_key(name: str) -> str:
    """webdataset's sample key of a member name: its folder and its base name up to the first dot."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def count_tar_samples(path: str | os.PathLike) -> int:
    """The samples of a local tar shard (runs of members with one key, as webdataset groups them).

    Only the headers are read; member data is skipped. A compressed tar is read with `tarfile` instead (slower,
    same count).
    """
    offsets = tar_sample_offsets(path)
    return _count_with_tarfile(path) if offsets is None else len(offsets) - 1


class TarMember(NamedTuple):
    start: int  # the offset of its first header (the pax or GNU long-name header before it, if any)
    name: str
    regular: bool  # a regular file (not a folder, link or device)
    data: int  # the offset of its data
    size: int
    end: int  # the offset after its data, padded to the block: where the next member starts
    sparse: bool = False  # a GNU sparse file: its stored bytes leave out the holes (tarfile rebuilds it)


class NotATar(ValueError):
    """Bytes that are not an uncompressed ustar, GNU or pax tar."""


def tar_members(read: Callable[[int, int], bytes]) -> Iterator[TarMember]:
    """The members of an uncompressed tar, `read(offset, size)` returning its bytes (fewer at its end).

    Pax extended headers (which webdataset's `TarWriter`, and so img2dataset, write before every member) and GNU
    long names give the next member its name and size; global headers are skipped. As in `tarfile`, only regular
    files (and types it does not know) have data after their header, whatever the size field of a folder or link
    says; a GNU sparse member's map blocks are skipped (its stored bytes are not the file: it is not `regular`).
    Only headers are read. Raises `NotATar` for a header that is not a tar's.
    """
    at, start, name, size, sparse = 0, None, None, None, False
    while len(header := read(at, _BLOCK)) == _BLOCK and (header[0] or header.strip(b"\0")):
        if header[257:262] not in (b"ustar", b"\0\0\0\0\0"):
            raise NotATar(f"no tar header at byte {at}")
        kind, length = header[156:157], _number(header[124:136])
        if kind != b"g":  # a global header belongs to no member
            start = at if start is None else start
        if kind in (b"x", b"X", b"L"):
            payload = read(at + _BLOCK, length)
            if kind == b"L":
                name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                records = _pax_records(payload)
                name = records.get("GNU.sparse.name", records.get("path", name))
                size = _number_text(records["size"]) if "size" in records else size
                sparse = sparse or any(key.startswith("GNU.sparse.") for key in records)
        elif kind not in (b"g", b"K"):  # a member (a global header or a long link name only gets skipped)
            data = at + _BLOCK
            if kind == b"S":  # old GNU sparse: blocks of its sparse map follow while "isextended" is set
                extended = header[482]
                while extended:
                    extended = (read(data, _BLOCK) + b"\0" * _BLOCK)[504]
                    data += _BLOCK
            name = name or member_name(header)
            if kind == b"\0" and name.endswith("/"):  # an old tar's folder (tarfile reads it as one)
                kind = b"5"
            length = (length if size is None else size) if kind in _REGULAR or kind not in _KNOWN else 0
            sparse = sparse or kind == b"S"
            regular = kind in _REGULAR and not sparse
            end = _end_of(data - _BLOCK, length)
            yield TarMember(start, name, regular, data, length, end, sparse)
            start, name, size, sparse, at = None, None, None, False, end
            continue
        at = _end_of(at, length)


def _end_of(at: int, length: int) -> int:
    """Where the member whose header is at `at`, with `length` bytes of data, ends (its data padded to the block)."""
    return at + _BLOCK + (length + _BLOCK - 1) // _BLOCK * _BLOCK


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal, or base-256 (GNU) when its first bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise NotATar(f"a tar header's number field holds {field!r}") from None


def _number_text(text: str) -> int:
    """A pax record's decimal number."""
    if not text.isascii() or not text.isdigit():
        raise NotATar(f"a pax header's number holds {text!r}")
    return int(text)


def _pax_records(payload: bytes) -> dict[str, str]:
    """The `"<length> <key>=<value>\\n"` records of a pax extended header."""
    records, at = {}, 0
    while at < len(payload):
        length = payload[at : at + 20].partition(b" ")[0]
        if not length.isdigit() or int(length) <= 0:
            break
        key, _, value = payload[at + len(length) + 1 : at + int(length) - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += int(length)
    return records


def tar_sample_offsets(path: str | os.PathLike) -> list[int] | None:
    """Where each sample of an uncompressed local tar starts (the byte offset of its first header), then where the
    last one ends; sample i is the bytes `offsets[i]:offsets[i + 1]`. None for a compressed tar or a file that is
    not a tar, or one holding a GNU sparse file. Only the headers are read; member data is skipped."""
    offsets, last, end = [], None, 0
    with open(path, "rb", buffering=0) as file:
        try:
            for member in tar_members(lambda offset, size: os.pread(file.fileno(), size, offset)):
                if member.sparse:  # its bytes are not the file: read the shard with tarfile, which rebuilds it
                    return None
                if member.regular and not member.name.rpartition("/")[2].startswith("__"):
                    if (key := _sample_key(member.name)) != last:
                        offsets.append(member.start)
                        last = key
                end = member.end
        except NotATar:
            return None
    return offsets + [end] if offsets else [0]


def member_name(header: bytes) -> str:
    """The member name in a ustar header (its prefix field joined to its name field)."""
    prefix = header[345:500].split(b"\0", 1)[0]
    name = header[:100].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _count_with_tarfile(path: str | os.PathLike) -> int:
    """The samples `tarfile` can read, up to where the shard is broken (training then counts it as broken)."""
    count, last = 0, None
    try:
        with tarfile.open(path, mode="r") as tar:
            for member in tar:
                tar.members = []
                if member.isreg() and not member.name.rpartition("/")[2].startswith("__"):
                    if (key := _sample_key(member.name)) != last:
                        count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = str(err).splitlines()[-1].lstrip("- ") if str(err) else type(err).__name__
        log.warning("shard %s is broken after %d samples (%s); counting only those", path, count, reason)
    return count


def _indexed_counts(folder: Path) -> dict[str, int]:
    """{shard path: samples} from the index files of one folder."""
    counts: dict[str, int] = {}
    for index in [*folder.glob("*-index.json"), folder / COUNTS_FILE]:
        if not index.is_file():
            continue
        try:
            entries = json.loads(index.read_text())["shards"]
            counts.update({str(folder / e["name"]): int(e["num_samples"]) for e in entries})
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable shard index %s", index)
    return counts


def _img2dataset_count(path: Path) -> int | None:
    stats = path.with_name(f"{path.name.removesuffix('.tar')}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def count_samples(urls: list[str]) -> int | None:
    """The samples of all shards, or None when a remote shard is not in an index."""
    counts = shard_counts(urls)
    return None if counts is None else sum(counts)


def shard_counts(urls: list[str]) -> list[int] | None:
    """The samples of each shard, or None when a remote shard is not in an index."""
    paths = [local_path(u) for u in urls]
    if any(p is None for p in paths):
        return None
    indexed: dict[str, int] = {}
    for folder in {p.parent for p in paths}:
        indexed |= _indexed_counts(folder)
    counts, headers_read, started = [], 0, time.perf_counter()
    for path in paths:
        count = indexed.get(str(path))
        if count is None:
            count = _img2dataset_count(path)
        if count is None:
            count = count_tar_samples(path)
            headers_read += 1
        counts.append(count)
    if headers_read:
        log.info(
            "counted the samples of %d shards from their tar headers in %.1f s (capline shards index "
            "writes %s to skip this)",
            headers_read, time.perf_counter() - started, COUNTS_FILE,
        )  # fmt: skip
    return counts


def write_counts(urls: list[str]) -> dict[Path, dict]:
    """Counts local shards from their headers and writes (or extends) `capline-counts.json` in their folders."""
    written: dict[Path, dict] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            raise ValueError(f"{url!r} is not a local file: only local shards can be indexed")
        index_file = path.parent / COUNTS_FILE
        if index_file not in written:
            old = json.loads(index_file.read_text()) if index_file.is_file() else {"shards": []}
            written[index_file] = {e["name"]: e["num_samples"] for e in old.get("shards", [])}
        written[index_file][path.name] = count_tar_samples(path)
    indexes = {}
    for index_file, counts in written.items():
        shards = [{"name": name, "num_samples": n} for name, n in sorted(counts.items())]
        indexes[index_file] = {"shards": shards, "num_samples": sum(counts.values())}
        tmp = index_file.with_name(index_file.name + ".tmp")
        tmp.write_text(json.dumps(indexes[index_file], indent=1))
        os.replace(tmp, index_file)
    return indexes
