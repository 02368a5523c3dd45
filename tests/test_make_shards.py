"""`capline shards` run as a subprocess on a tiny fake COCO layout and on the synthetic scenes."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# image_id -> (folder, size, colour); every image has its own colour so the tests can tell them apart.
_IMAGES = {
    1: ("train2014", (120, 80), (200, 30, 30)),
    2: ("train2014", (64, 96), (30, 200, 30)),
    3: ("train2014", (40, 30), (30, 30, 200)),  # already smaller than --max-size: copied, not re-encoded
    10: ("val2014", (200, 150), (200, 200, 30)),
    11: ("val2014", (90, 90), (200, 30, 200)),
}
_MISSING, _GARBAGE, _TRUNCATED = 4, 5, 6  # listed in the annotations, but absent / not an image / cut short
_UNCAPTIONED = 7  # a good image that no annotation describes


def _file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def _jpeg(size, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _annotations(folder: str, ids: list[int], uncaptioned: tuple[int, ...] = ()) -> dict:
    return {
        "images": [
            {"id": i, "file_name": _file_name(folder, i), "width": 1, "height": 1} for i in [*ids, *uncaptioned]
        ],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "caption": f"  A photo number {i} of a Thing{k}.\n"}
            for i in ids
            for k in range(2)
        ],
    }


@pytest.fixture
def coco(tmp_path) -> Path:
    """COCO-2014-like layout: coco/{train2014,val2014}/*.jpg and coco/annotations/captions_{train,val}2014.json."""
    root = tmp_path / "coco"
    for image_id, (folder, size, colour) in _IMAGES.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / _file_name(folder, image_id)).write_bytes(_jpeg(size, colour))
    (root / "train2014" / _file_name("train2014", _UNCAPTIONED)).write_bytes(_jpeg((50, 50), (90, 90, 90)))
    (root / "train2014" / _file_name("train2014", _GARBAGE)).write_bytes(b"this is not a jpeg")
    truncated = _jpeg((300, 200), (10, 10, 10))
    (root / "train2014" / _file_name("train2014", _TRUNCATED)).write_bytes(truncated[: len(truncated) // 2])
    (root / "annotations").mkdir()
    train_ids = [1, 2, 3, _MISSING, _GARBAGE, _TRUNCATED]
    train = _annotations("train2014", train_ids, uncaptioned=(_UNCAPTIONED,))
    (root / "annotations/captions_train2014.json").write_text(json.dumps(train))
    (root / "annotations/captions_val2014.json").write_text(json.dumps(_annotations("val2014", [10, 11])))
    return root


def make_shards(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "capline", "shards", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_shards(out: Path, split: str) -> dict[str, dict]:
    """Reads every shard of a split into {key: {"image": bytes, "ext": str, "meta": dict}}."""
    samples = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {})
                if ext == "json":
                    entry["meta"] = json.loads(data)
                else:
                    entry["image"], entry["ext"] = data, ext
    return samples


def test_coco_train_split_resized_with_workers(coco, tmp_path):
    out = tmp_path / "out"
    result = make_shards(
        "coco",
        "--images",
        coco,
        "--annotations",
        coco / "annotations/captions_train2014.json",
        "--out",
        out,
        "--split",
        "train",
        "--max-size",
        48,
        "--shard-size",
        2,
        "--workers",
        2,
        "--min-count",
        3,
    )

    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("wrote 3 samples in 2 shards")
    assert summary.endswith("skipped 4 (corrupt: 2, missing: 1, no captions: 1)")
    assert _file_name("train2014", _GARBAGE) in result.stderr and _file_name("train2014", _MISSING) in result.stderr
    index = json.loads((out / "train-index.json").read_text())
    assert index == {
        "split": "train",
        "num_samples": 3,
        "shards": [{"name": "train-000000.tar", "num_samples": 2}, {"name": "train-000001.tar", "num_samples": 1}],
    }
    samples = read_shards(out, "train")
    assert sorted(samples) == ["000000000001", "000000000002", "000000000003"]
    for key, sample in samples.items():
        image_id = int(key)
        image = Image.open(io.BytesIO(sample["image"]))
        assert sample["ext"] == "jpg" and image.format == "JPEG"
        assert min(image.size) == min(48, min(_IMAGES[image_id][1]))
        assert max(abs(a - b) for a, b in zip(image.getpixel((5, 5)), _IMAGES[image_id][2])) <= 12
        assert sample["meta"] == {
            "image_id": image_id,
            "captions": [f"A photo number {image_id} of a Thing0.", f"A photo number {image_id} of a Thing1."],
        }
    assert Image.open(io.BytesIO(samples["000000000001"]["image"])).size == (72, 48)
    assert Image.open(io.BytesIO(samples["000000000002"]["image"])).size == (48, 72)
    # Words of the 6 captions of the 3 written images: "thing0", "thing1" (3 each) pass --min-count 3, ids (2) do not.
    words = json.loads((out / "vocab.json").read_text())["words"]
    assert sorted(words[4:]) == ["a", "number", "of", "photo", "thing0", "thing1"]

    single = tmp_path / "single"
    make_shards(
        "coco",
        "--images",
        coco,
        "--annotations",
        coco / "annotations/captions_train2014.json",
        "--out",
        single,
        "--split",
        "train",
        "--max-size",
        48,
        "--shard-size",
        2,
        "--workers",
        1,
    )
    for name in ("train-000000.tar", "train-000001.tar"):
        assert (single / name).read_bytes() == (out / name).read_bytes()  # same output for any number of workers


def test_coco_without_max_size_copies_the_original_bytes(coco, tmp_path):
    out = tmp_path / "out"
    result = make_shards(
        "coco",
        "--images",
        coco,
        "--annotations",
        coco / "annotations/captions_val2014.json",
        "--out",
        out,
        "--split",
        "val",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"wrote 2 samples in 1 shards to {out}; skipped 0 (none)"
    samples = read_shards(out, "val")
    for image_id in (10, 11):
        original = (coco / "val2014" / _file_name("val2014", image_id)).read_bytes()
        assert samples[f"{image_id:012d}"]["image"] == original
    assert not (out / "vocab.json").exists()  # not a training split


def test_karpathy_split_selects_its_images_across_folders(coco, tmp_path):
    karpathy = {
        "images": [
            {
                "cocoid": 1,
                "filepath": "train2014",
                "filename": _file_name("train2014", 1),
                "split": "train",
                "sentences": [{"raw": "karpathy one"}],
            },
            {
                "cocoid": 10,
                "filepath": "val2014",
                "filename": _file_name("val2014", 10),
                "split": "restval",
                "sentences": [{"raw": "karpathy ten"}],
            },
            {
                "cocoid": 11,
                "filepath": "val2014",
                "filename": _file_name("val2014", 11),
                "split": "test",
                "sentences": [{"raw": "karpathy eleven"}],
            },
            {
                "cocoid": 2,
                "filepath": "train2014",
                "filename": _file_name("train2014", 2),
                "split": "val",
                "sentences": [{"raw": "karpathy two"}],
            },
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    annotations = [coco / "annotations/captions_train2014.json", coco / "annotations/captions_val2014.json"]

    def run(split, out, *extra):
        return make_shards(
            "coco",
            "--images",
            coco,
            "--annotations",
            *annotations,
            "--out",
            out,
            "--split",
            split,
            "--karpathy",
            tmp_path / "dataset_coco.json",
            "--karpathy-split",
            *extra,
        )

    train = run("train", tmp_path / "train", "train+restval", "--min-count", 1)
    assert train.returncode == 0, train.stderr
    samples = read_shards(tmp_path / "train", "train")
    assert sorted(samples) == ["000000000001", "000000000010"]
    # The official annotations' captions win over the Karpathy file's copy of them.
    assert samples["000000000010"]["meta"]["captions"][0] == "A photo number 10 of a Thing0."
    assert (tmp_path / "train/vocab.json").exists()

    # Without --annotations, the Karpathy file alone gives files and captions.
    test = make_shards(
        "coco",
        "--images",
        coco,
        "--out",
        tmp_path / "test",
        "--split",
        "test",
        "--karpathy",
        tmp_path / "dataset_coco.json",
        "--karpathy-split",
        "test",
    )
    assert test.returncode == 0, test.stderr
    assert read_shards(tmp_path / "test", "test") == {
        "000000000011": {
            "image": (coco / "val2014" / _file_name("val2014", 11)).read_bytes(),
            "ext": "jpg",
            "meta": {"image_id": 11, "captions": ["karpathy eleven"]},
        }
    }


@pytest.mark.parametrize("problem", ["no_images_dir", "no_annotations_file", "not_coco", "bad_karpathy_split"])
def test_bad_arguments_exit_2_with_one_sentence(coco, tmp_path, problem):
    annotations = coco / "annotations/captions_train2014.json"
    images = coco
    extra = []
    if problem == "no_images_dir":
        images = tmp_path / "nowhere"
    elif problem == "no_annotations_file":
        annotations = tmp_path / "captions_missing.json"
    elif problem == "not_coco":
        annotations = tmp_path / "list.json"
        annotations.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    else:
        extra = ["--karpathy", annotations, "--karpathy-split", "training"]
    result = make_shards(
        "coco", "--images", images, "--annotations", annotations, "--out", tmp_path / "out", "--split", "train", *extra
    )

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("capline shards: error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_synthetic_prints_the_config_lines_and_reuses(tmp_path):
    out = tmp_path / "syn"
    args = ("synthetic", "--out", out, "--num-train", 30, "--num-val", 10, "--shard-size", 10)
    first, second = make_shards(*args), make_shards(*args)

    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"data.train_shards: {out}/train-{{000000..000002}}.tar",
        f"data.val_shards: {out}/val-{{000000..000000}}.tar",
        f"data.vocab: {out}/vocab.json",
        f"wrote 40 samples (train 30, val 10) in 4 shards (train 3, val 1) to {out}; skipped 0",
    ]
    assert second.stdout.splitlines()[-1].startswith("reused 40 samples")
    assert len(list(out.glob("*.tar"))) == 4
