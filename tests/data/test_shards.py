"""ShardWriter, read_index and shard_pattern: shard rolling, atomic writes, the index, key checks."""

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from capline.data.shards import ShardIndexError, ShardWriter, encode_jpeg, read_index, shard_pattern


def _jpeg(value: int) -> bytes:
    return encode_jpeg(Image.new("RGB", (8, 8), (value, 0, 0)))


def _samples(n: int, start: int = 0) -> list[tuple]:
    return [
        (f"{i:06d}", _jpeg(i), "jpg", {"image_id": i, "captions": [f"caption {i}"]}) for i in range(start, start + n)
    ]


@pytest.fixture
def out(tmp_path):
    """A folder of its own: the shared conftest puts `wandb-home/` into every tmp_path."""
    return tmp_path / "shards"


def test_writer_rolls_shards_and_writes_the_index(out):
    with ShardWriter(out, "train", shard_size=3) as writer:
        for sample in _samples(7):
            writer.write(sample)

    expected = {
        "split": "train",
        "num_samples": 7,
        "shards": [
            {"name": "train-000000.tar", "num_samples": 3},
            {"name": "train-000001.tar", "num_samples": 3},
            {"name": "train-000002.tar", "num_samples": 1},
        ],
    }
    assert writer.index == expected
    assert read_index(out / "train-index.json") == expected
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train-index.json",
    ]
    with tarfile.open(out / "train-000001.tar") as tar:
        assert tar.getnames() == ["000003.jpg", "000003.json", "000004.jpg", "000004.json", "000005.jpg", "000005.json"]


def test_shards_read_back_with_webdataset(out):
    with ShardWriter(out, "val", shard_size=2) as writer:
        for sample in _samples(5):
            writer.write(sample)
        writer.write(("png_one", b"\x89PNG-bytes-kept-as-is", "png", {"image_id": 99, "captions": ["a b"]}))

    pattern = shard_pattern(out, "val", len(writer.index["shards"]))
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002", "000003", "000004", "png_one"]
    assert json.loads(samples[3]["json"]) == {"image_id": 3, "captions": ["caption 3"]}
    assert Image.open(io.BytesIO(samples[4]["jpg"])).getpixel((4, 4))[0] == pytest.approx(4, abs=3)
    assert samples[5]["png"] == b"\x89PNG-bytes-kept-as-is"


def test_same_samples_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "train", shard_size=10) as writer:
            for sample in _samples(4):
                writer.write(sample)
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()


@pytest.mark.parametrize(("key", "ext"), [("a.b", "jpg"), ("dir/x", "jpg"), ("", "jpg"), ("ok", "gif")])
def test_unsafe_keys_and_extensions_are_rejected(out, key, ext):
    with ShardWriter(out, "train") as writer, pytest.raises(ValueError, match="key|extension"):
        writer.write((key, b"x", ext, {}))


def test_duplicate_key_is_rejected(out):
    with ShardWriter(out, "train") as writer:
        writer.write(_samples(1)[0])
        with pytest.raises(ValueError, match="already written"):
            writer.write(_samples(1)[0])


def test_failure_leaves_no_partial_shard_and_no_index(out):
    with pytest.raises(RuntimeError), ShardWriter(out, "train", shard_size=3) as writer:
        for sample in _samples(5):
            writer.write(sample)
        raise RuntimeError("interrupted")

    # The full first shard stays (a rewrite replaces it); the half-written second one and the index do not exist.
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]
    with pytest.raises(ShardIndexError, match="does not exist"):
        read_index(out / "train-index.json")


def test_rewrite_removes_stale_shards_and_temp_files_of_its_split_only(out):
    with ShardWriter(out, "train", shard_size=2) as writer:
        for sample in _samples(5):
            writer.write(sample)
    with ShardWriter(out, "val", shard_size=2) as writer:
        writer.write(_samples(1)[0])
    (out / "train-000007.tar.tmp").write_bytes(b"left by a killed run")

    with ShardWriter(out, "train", shard_size=2) as writer:
        for sample in _samples(3, start=10):
            writer.write(sample)

    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-index.json",
        "val-000000.tar",
        "val-index.json",
    ]
    assert read_index(out / "train-index.json")["num_samples"] == 3


def test_shard_pattern():
    assert shard_pattern("out", "train", 4) == "out/train-{000000..000003}.tar"
    assert shard_pattern("out/", "val", 1) == "out/val-{000000..000000}.tar"
    with pytest.raises(ValueError, match="at least one shard"):
        shard_pattern("out", "val", 0)


@pytest.mark.parametrize("damage", ["total", "name", "not_json"])
def test_read_index_rejects_inconsistent_files(out, damage):
    with ShardWriter(out, "train", shard_size=2) as writer:
        for sample in _samples(3):
            writer.write(sample)
    path = out / "train-index.json"
    index = json.loads(path.read_text())
    if damage == "total":
        index["num_samples"] = 4
    elif damage == "name":
        index["shards"][1]["name"] = "train-000005.tar"
    path.write_text("{" if damage == "not_json" else json.dumps(index))
    with pytest.raises(ShardIndexError):
        read_index(path)
