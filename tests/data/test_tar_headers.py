"""Tar headers read without tarfile: ustar, GNU long names, and the pax headers that webdataset's TarWriter (and
so img2dataset) writes before every member. Samples read by their byte offsets equal webdataset's own reading."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import webdataset as wds

from capline.data.counting import count_tar_samples, tar_members, tar_sample_offsets
from capline.data.pipeline import _parse_sample

LONG = "a-folder-name-long-enough-that-ustar-cannot-hold-it/" * 3  # 156 characters: pax or GNU long names


def write_with_tarfile(path, fmt, members, pax_headers=None):
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5  # a fractional time: pax writes a record for it
            tar.addfile(info, io.BytesIO(data))


def members(count: int, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        out += [(f"{prefix}{i:05d}.jpg", os.urandom(700 + 97 * i)), (f"{prefix}{i:05d}.txt", f"caption {i}".encode())]
    return out


def webdataset_samples(path) -> list[dict]:
    return [
        {k: v for k, v in s.items() if k != "__url__"} for s in wds.tariterators.tarfile_samples([{"url": str(path)}])
    ]


def offset_samples(path) -> list[dict | None]:
    offsets, data = tar_sample_offsets(path), open(path, "rb").read()
    return [
        _parse_sample(data[a:b], b - a, str(path)) for a, b in zip(offsets, offsets[1:])
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    ["webdataset TarWriter (pax)", "ustar", "gnu long names", "pax long names", "pax global header"],
)
def test_samples_by_offset_equal_webdatasets_reading(tmp_path, kind):
    path = tmp_path / "shard.tar"
    if kind.startswith("webdataset"):
        with wds.TarWriter(str(path)) as writer:
            for i in range(7):
                writer.write({"__key__": f"{i:09d}", "jpg": os.urandom(900 + 31 * i), "txt": f"caption {i}"})
    else:
        prefix = LONG if "long" in kind else ""
        fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(kind.split()[0], tarfile.PAX_FORMAT)
        write_with_tarfile(path, fmt, members(7, prefix), {"comment": "global"} if "global" in kind else None)
    expected = webdataset_samples(path)
    assert len(expected) == 7 and count_tar_samples(path) == 7
    read = offset_samples(path)
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in read] == expected


def test_every_member_of_a_pax_tar_is_found_with_its_name_and_data(tmp_path):
    path = tmp_path / "pax.tar"
    written = members(3, LONG)
    write_with_tarfile(path, tarfile.PAX_FORMAT, written)
    data = path.read_bytes()
    found = [(m.name, data[m.data : m.data + m.size]) for m in tar_members(lambda at, n: data[at : at + n])]
    assert found == written


def test_a_sample_cut_short_is_none_not_garbage(tmp_path):
    path = tmp_path / "pax.tar"
    write_with_tarfile(path, tarfile.PAX_FORMAT, [("0.jpg", os.urandom(900)), ("0.txt", os.urandom(3000))])
    offsets, data = tar_sample_offsets(path), path.read_bytes()
    first = data[offsets[0] : offsets[1]]
    assert _parse_sample(first, len(first), "x") is not None
    # the reader asks for the sample's length and gets fewer bytes where the shard was cut
    assert _parse_sample(first[:-600], len(first), "x") is None  # in its last member's data
    assert _parse_sample(first[:700], len(first), "x") is None  # inside the pax header's payload


def test_a_file_that_is_not_a_tar_has_no_offsets(tmp_path):
    path = tmp_path / "not.tar"
    path.write_bytes(b"PK\x03\x04" + os.urandom(4000))
    assert tar_sample_offsets(path) is None


@pytest.mark.parametrize("field", ["header size", "pax size"])
def test_a_garbled_size_field_reads_as_not_a_tar_not_a_crash(tmp_path, field):
    path = tmp_path / "garbled.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members(2):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if field == "pax size":
                info.pax_headers = {"size": "x9y"}  # a pax size record that is not a number
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(path.read_bytes())
    if field == "header size":
        data[124:136] = b"zz garbage\0\0"  # the first header's size field: not octal
        path.write_bytes(bytes(data))
    assert tar_sample_offsets(path) is None  # then read as a stream, which counts the shard as broken
    assert count_tar_samples(path) <= 2  # what tarfile can read of it, without raising
    assert _parse_sample(bytes(data[:4096]), 4096, "x") is None


def tarfile_view(path) -> list[tuple]:
    """What tarfile reads of every member: header offset, name, whether it is a plain regular file, its data."""
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        return [
            (m.offset, m.name.rstrip("/"), m.isreg() and not m.issparse(),
             data[m.offset_data : m.offset_data + m.size] if m.isreg() and not m.issparse() else None)
            for m in tar.getmembers()
        ]  # fmt: skip


def walk_view(path) -> list[tuple]:
    data = open(path, "rb").read()
    return [
        (m.start, m.name.rstrip("/"), m.regular, data[m.data : m.data + m.size] if m.regular else None)
        for m in tar_members(lambda at, n: data[at : at + n])
    ]


def write_every_member_type(path, fmt):
    """The member types of CPython's testtar.tar, written by tarfile: each type flag, a folder and a link whose
    size fields are not 0 (tarfile reads no data after them), contiguous and old-v7 files, long names."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, size in [
            ("ustar/regtype", tarfile.REGTYPE, 7011), ("ustar/conttype", tarfile.CONTTYPE, 7011),
            ("ustar/dirtype", tarfile.DIRTYPE, 0), ("ustar/dirtype-with-size", tarfile.DIRTYPE, 255),
            ("ustar/lnktype", tarfile.LNKTYPE, 0), ("ustar/symtype", tarfile.SYMTYPE, 0),
            ("ustar/blktype", tarfile.BLKTYPE, 0), ("ustar/chrtype", tarfile.CHRTYPE, 0),
            ("ustar/fifotype", tarfile.FIFOTYPE, 0), ("misc/regtype-old-v7", tarfile.AREGTYPE, 7011),
            (LONG + "regtype", tarfile.REGTYPE, 300), ("umlauts-ÄÖÜäöüß", tarfile.REGTYPE, 10),
        ]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, size
            if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                info.linkname = "ustar/regtype"
            regular = kind in (tarfile.REGTYPE, tarfile.CONTTYPE, tarfile.AREGTYPE)
            tar.addfile(info, io.BytesIO(os.urandom(size)) if regular else None)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_member_type_is_walked_as_tarfile_reads_it(tmp_path, fmt):
    path = tmp_path / "types.tar"
    write_every_member_type(path, fmt)
    expected = tarfile_view(path)
    assert len(expected) == 12 and walk_view(path) == expected


@pytest.mark.parametrize("sparse_format", ["gnu", "0.0", "0.1", "1.0"])
def test_gnu_tar_sparse_members_are_walked_past_as_tarfile_reads_them(tmp_path, sparse_format):
    """A sparse file (holes between its data) archived by GNU tar, between two regular files."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_bytes(os.urandom(1000))
    with open(folder / "sparse", "wb") as f:
        for offset in (0, 40_000, 81_920):
            f.seek(offset)
            f.write(os.urandom(4096))
    (folder / "b.txt").write_bytes(os.urandom(2000))
    options = ["--format=gnu"] if sparse_format == "gnu" else ["--format=posix", f"--sparse-version={sparse_format}"]
    path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-c", "-S", *options, "-f", str(path), "-C", str(folder), "a.txt", "sparse", "b.txt"],
                   check=True)  # fmt: skip
    expected = tarfile_view(path)
    with tarfile.open(path) as tar:
        assert [m.issparse() for m in tar.getmembers()] == [False, True, False]  # GNU tar did write it sparse
    assert walk_view(path) == expected
    assert tar_sample_offsets(path) is None  # its stored bytes are not the file: the shard is read with tarfile...
    assert count_tar_samples(path) == 3  # ...which counts a, sparse and b (and rebuilds the sparse file's holes)


def test_cpythons_own_testtar_is_walked_as_tarfile_reads_it():
    import glob
    import sysconfig

    found = glob.glob(os.path.join(sysconfig.get_path("stdlib"), "test", "**", "testtar.tar"), recursive=True)
    found += glob.glob(os.path.expanduser("~/.pyenv/versions/*/lib/python3*/test/**/testtar.tar"), recursive=True)
    if not found:
        pytest.skip("no CPython test suite with testtar.tar on this machine")
    assert walk_view(found[0]) == tarfile_view(found[0])
