"""The shard layouts capline reads (capline, img2dataset, CLIP-benchmark's txt), counted skips for bad ones, merged
evaluation images (exactly once across ranks), and sample counts without an index."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from capline.data.collate import CaptionBatcher, ImageTransform
from capline.data.counting import COUNTS_FILE, count_samples, count_tar_samples, write_counts
from capline.data.datamodule import CaptionDataModule, DataConfigError
from capline.data.decode import SKIP_REASONS, SkipCounter, SkipSample, decode_sample
from capline.data.groups import merge_image_samples
from capline.data.layouts import LayoutReader, detect_layout, looks_like
from capline.data.pipeline import EvalStream
from capline.vocab import Vocabulary

CONFIG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}


def image_bytes(colour: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (colour, 255 - colour, 90)).save(
        buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    return buffer.getvalue()


def img2dataset_sample(key: str, image: int, caption: str, url: bool = True) -> dict:
    meta = {"caption": caption, "key": key, "status": "success", "width": 40, "height": 30}
    if url:
        meta["url"] = f"http://images.example.org/val2014/COCO_val2014_{image:012d}.jpg"
    return {"__key__": key, "jpg": image_bytes(image), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    return str(path)


def test_each_layout_reads_its_captions():
    txt = {"__key__": "s0000003", "webp": image_bytes(3, "WEBP"), "txt": b"a red cat\n\n  a cat  on a mat \n"}
    assert LayoutReader("txt")(txt).captions == ["a red cat", "a cat on a mat"]
    assert decode_sample(txt, None, LayoutReader("txt")).image.size == (40, 30)  # .webp decodes
    one = LayoutReader("img2dataset")(img2dataset_sample("000000007", 42, "a dog  runs"))
    assert (one.captions, one.image_id) == (["a dog runs"], 42)  # id from the url's COCO file name
    assert one.group == "http://images.example.org/val2014/COCO_val2014_000000000042.jpg"
    no_txt = img2dataset_sample("000000008", 42, "from the json") | {"txt": None}
    assert LayoutReader("img2dataset")({k: v for k, v in no_txt.items() if v is not None}).captions == ["from the json"]
    capline = {"__key__": "k", "jpg": image_bytes(1), "json": json.dumps({"image_id": 5, "captions": ["x y"]}).encode()}
    assert LayoutReader("capline")(capline).captions == ["x y"]
    assert [looks_like(s) for s in (txt, img2dataset_sample("1", 1, "c"), capline)] == ["txt", "img2dataset", "capline"]
    layout, evidence = detect_layout([txt, txt, capline])
    assert layout == "txt" and "2 of the first 3 samples" in evidence


@pytest.mark.parametrize(
    ("sample", "layout", "reason"),
    [
        ({"__key__": "a", "jpg": image_bytes(1), "txt": b" \n \n"}, "txt", "empty_captions"),
        ({"__key__": "a", "jpg": image_bytes(1), "txt": b"\xff\xfe\x00\x01binary"}, "txt", "bad_text"),
        ({"__key__": "a", "jpg": image_bytes(1), "txt": b"ok\x00\x00\x00"}, "txt", "bad_text"),
        ({"__key__": "a", "webp": b"RIFF\x10\x00\x00\x00WEBPVP8 broken", "txt": b"a cat"}, "txt", "corrupt_image"),
        ({"__key__": "a", "txt": b"a cat"}, "txt", "missing_image"),
        ({"__key__": "a", "jpg": image_bytes(1), "txt": b"a cat"}, "capline", "other_layout"),  # mixed shards
        (img2dataset_sample("a", 1, "a cat"), "capline", "other_layout"),
        ({"__key__": "a", "jpg": image_bytes(1), "json": b'{"captions": ["a"]}'}, "txt", "other_layout"),
        ({"__key__": "a", "jpg": image_bytes(1), "json": b"{not json"}, "img2dataset", "missing_captions"),
    ],
)
def test_bad_samples_are_counted_skips(sample, layout, reason):
    with pytest.raises(SkipSample) as skip:
        decode_sample(sample, None, LayoutReader(layout))
    assert skip.value.reason == reason and reason in SKIP_REASONS


def test_img2dataset_images_are_scored_once_with_all_references_across_ranks(tmp_path):
    # 5 images x 3 captions, one sample per caption; image 2's samples straddle the two shards, and image 4's
    # samples have no url (grouped by their image bytes).
    samples = [
        img2dataset_sample(f"{i:09d}", i // 3, f"caption {i % 3} of image {i // 3}", url=i < 12) for i in range(15)
    ]
    urls = [write_shard(tmp_path / "00000.tar", samples[:7]), write_shard(tmp_path / "00001.tar", samples[7:])]
    reader = LayoutReader("img2dataset")
    merged = merge_image_samples(urls, reader)
    assert sorted(len(refs) for refs in merged.values()) == [3] * 5
    vocab = Vocabulary.build(["caption of image 0 1 2 3 4"], min_count=1)
    seen = Counter()
    for rank in range(2):  # two ranks of one worker each: 2 shards for 2 slots
        batcher = CaptionBatcher(vocab, ImageTransform(CONFIG), 8, 5, train=False, read_captions=reader)
        for batch in EvalStream(urls, batcher, 4, rank, 2, merged=merged):
            for captions in batch["captions"]:
                seen[captions[0].rsplit(" ", 1)[1]] += 1
                assert sorted(captions) == sorted(f"caption {k} of image {captions[0][-1]}" for k in range(3))
            assert (batch["refs"][:, :3].ne(0).any(-1)).all()  # 3 references per image reach the metric
    assert seen == Counter({str(i): 1 for i in range(5)})


def test_tar_header_count_matches_webdataset_and_the_counts_file(tmp_path):
    samples = [img2dataset_sample(f"{i:09d}", i, "c") for i in range(23)] + [{"__key__": "s9", "txt": b"only text"}]
    shard = write_shard(tmp_path / "00000.tar", samples)
    with tarfile.open(tmp_path / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as tar:  # long names: tarfile path
        for key in ("x" * 120, "y" * 120):
            for ext in ("jpg", "txt"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    expected = len(list(wds.WebDataset(shard, shardshuffle=False)))
    assert count_tar_samples(shard) == expected == 24
    assert count_tar_samples(tmp_path / "gnu.tar") == 2
    assert count_samples([shard]) == 24
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 30, "successes": 21}))  # img2dataset's
    assert count_samples([shard]) == 21
    write_counts([shard])
    assert json.loads((tmp_path / COUNTS_FILE).read_text())["shards"] == [{"name": "00000.tar", "num_samples": 24}]
    assert count_samples([shard]) == 24  # an index wins over the stats file
    assert count_samples(["http://127.0.0.1:1/00000.tar"]) is None  # remote: data.samples_per_epoch says it


def test_data_module_detects_the_layout_and_refuses_unusable_shards(tmp_path, caplog):
    good = write_shard(tmp_path / "good.tar", [img2dataset_sample(f"{i:09d}", i, "a cat") for i in range(8)])
    vocab = tmp_path / "vocab.json"
    Vocabulary.build(["a cat"], min_count=1).save(vocab)

    def first_batch(shards: str, **kwargs):
        data = CaptionDataModule(train_shards=shards, vocab=str(vocab), global_batch_size=4, num_workers=0, **kwargs)
        data.image_config = CONFIG
        data.setup("fit")
        return next(iter(data.train_dataloader()))

    with caplog.at_level("INFO"):
        assert first_batch(good)["images"].shape[0] == 4
    assert "data.format auto: data.train_shards holds img2dataset shards" in caplog.text
    with pytest.raises(
        DataConfigError, match=r"other_layout: 8\); they look like img2dataset shards: set data.format: img2dataset$"
    ):
        first_batch(good, format="capline")
    bad = write_shard(tmp_path / "bad.tar", [{"__key__": f"{i}", "jpg": b"junk", "txt": b"a cat"} for i in range(5)])
    with pytest.raises(
        DataConfigError,
        match=r"^data.train_shards has no usable sample: the first 5 samples \(1 shard\(s\)\) were all skipped "
        r"\(corrupt_image: 5\)$",
    ):
        first_batch(bad)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataConfigError, match="fit no shard layout"):
        first_batch(str(tmp_path / "empty.tar"))
    with pytest.raises(DataConfigError, match="data.format 'json' is not one of auto, capline, img2dataset, txt"):
        first_batch(good, format="json")


def test_a_batch_of_skipped_samples_is_counted_not_built_from_nothing():
    vocab = Vocabulary.build(["a cat"], min_count=1)
    batcher = CaptionBatcher(vocab, ImageTransform(CONFIG), 8, 5, train=True, read_captions=LayoutReader("txt"))
    counter = SkipCounter()
    batch = batcher([{"__key__": "a", "jpg": b"junk", "txt": b"a cat"}, {"__key__": "b", "txt": b""}], counter, 0)
    assert batch["images"].shape[0] == 0
    counts = dict(zip(SKIP_REASONS, batch["skipped"].tolist()))
    assert counts == {r: int(r in ("corrupt_image", "empty_captions")) for r in SKIP_REASONS}
