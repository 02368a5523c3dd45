"""`capline shards` for the seeds' datasets and for shards made elsewhere: Flickr8k/30k caption files, Karpathy's
Flickr JSON, and `vocab` / `index` over CLIP-benchmark-layout shards, run as the real command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from capline.data.counting import COUNTS_FILE

REPO = Path(__file__).resolve().parents[1]
NAMES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]


def make_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "capline", "shards", *args], capture_output=True, text=True, timeout=300
    )


def read_samples(folder: Path, split: str) -> dict[int, list[str]]:
    pattern = str(folder / f"{split}-000000.tar")
    return {json.loads(s["json"])["image_id"]: json.loads(s["json"])["captions"] for s in wds.WebDataset(pattern)}


@pytest.fixture
def flickr(tmp_path) -> Path:
    """Flickr8k as distributed: Flicker8k_Dataset/ (sic), the token file, split lists; one listed image is missing."""
    images = tmp_path / "Flicker8k_Dataset"
    images.mkdir()
    for i, name in enumerate(NAMES[:2]):
        Image.new("RGB", (50, 40), (80 * i, 90, 200)).save(images / name)
    lines = [f"{name}#{k}\tA dog number {i} runs , caption {k} ." for i, name in enumerate(NAMES) for k in range(5)]
    lines.insert(3, "this line is not a caption line")
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join(NAMES) + "\n")
    return tmp_path


def test_flickr8k_token_file_with_split_list(flickr):
    out = flickr / "shards"
    result = make_shards(
        "flickr", "--images", str(flickr / "Flicker8k_Dataset"), "--captions", str(flickr / "Flickr8k.token.txt"),
        "--split-file", str(flickr / "Flickr_8k.trainImages.txt"), "--split", "train", "--out", str(out),
        "--min-count", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 1 malformed line(s) of" in result.stderr and "line 4" in result.stderr
    assert "wrote 2 samples in 1 shards" in result.stdout and "skipped 1 (missing: 1)" in result.stdout
    samples = read_samples(out, "train")
    assert sorted(samples) == [1000268201, 1001773457]  # Flickr photo ids from the file names
    assert samples[1000268201] == [f"A dog number 0 runs , caption {k} ." for k in range(5)]
    assert "dog" in json.loads((out / "vocab.json").read_text())["words"]


def test_flickr30k_results_csv(tmp_path):
    Image.new("RGB", (50, 40), (1, 2, 3)).save(tmp_path / "1000092795.jpg")
    rows = ["image_name| comment_number| comment"] + [
        f"1000092795.jpg| {k}| Two young guys number {k} ." for k in range(5)
    ]
    rows.append("19999  2199200615.jpg| 4 A dog runs across the grass .")  # the Kaggle file's known broken line
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    result = make_shards(
        "flickr", "--images", str(tmp_path), "--captions", str(tmp_path / "results.csv"), "--split", "test",
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "malformed line(s)" in result.stderr and "line 7" in result.stderr
    assert read_samples(tmp_path / "out", "test") == {1000092795: [f"Two young guys number {k} ." for k in range(5)]}


def test_karpathy_flickr_json(flickr):
    def sentences(i: int) -> list[dict]:
        return [{"raw": f"Raw sentence {k} of {i}.", "tokens": [], "imgid": i, "sentid": 5 * i + k} for k in range(5)]

    images = [
        {"filename": name, "imgid": i, "split": "val" if i == 1 else "train", "sentids": [], "sentences": sentences(i)}
        for i, name in enumerate(NAMES[:2])
    ]
    dataset = {"images": images, "dataset": "flickr8k"}
    (flickr / "dataset_flickr8k.json").write_text(json.dumps(dataset))
    out = flickr / "karpathy"
    result = make_shards(
        "karpathy", "--dataset", str(flickr / "dataset_flickr8k.json"), "--images", str(flickr),
        "--karpathy-split", "val", "--split", "val", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_samples(out, "val") == {1001773457: [f"Raw sentence {k} of 1." for k in range(5)]}
    assert not (out / "vocab.json").exists()  # only training splits write one by default


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"images": [{"file": "x.jpg", "split": "train"}]}, ["is not one of Karpathy's split files", "'filename'"]),
        ([1, 2], ["must hold a JSON object"]),
    ],
)
def test_karpathy_json_of_another_shape_fails_in_one_sentence(flickr, content, words):
    (flickr / "other.json").write_text(json.dumps(content))
    result = make_shards(
        "karpathy", "--dataset", str(flickr / "other.json"), "--images", str(flickr), "--karpathy-split", "train",
        "--split", "train", "--out", str(flickr / "o"),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("capline shards: error:") and all(w in message for w in words), message


def test_token_file_without_a_caption_line_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.token").write_text("\n\nnot a caption line at all\n")
    result = make_shards(
        "flickr", "--images", str(tmp_path), "--captions", str(tmp_path / "bad.token"), "--split", "train",
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.token' has no line 'name.jpg#0<TAB>caption'" in result.stderr
    assert "line 3: 'not a caption line at all'" in result.stderr


def test_vocab_and_index_of_clip_benchmark_shards(tmp_path):
    """CLIP-benchmark's layout (webdataset's ShardWriter, keys s%07d, lossless .webp, .txt with one caption a line)."""
    with wds.ShardWriter(str(tmp_path / "%d.tar"), maxcount=3) as writer:
        for i in range(7):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 24), (30 * i, 0, 0)).save(buffer, format="WEBP", lossless=True)
            captions = "\n".join(f"a zebra number {i} grazes" for _ in range(5)) if i != 6 else ""
            writer.write({"__key__": f"s{i:07d}", "webp": buffer.getvalue(), "txt": captions})
    pattern = str(tmp_path / "{0..2}.tar")
    result = make_shards("vocab", "--shards", pattern, "--out", str(tmp_path / "vocab.json"), "--min-count", "6")
    assert result.returncode == 0, result.stderr
    assert "from 6 txt samples of 3 shards" in result.stdout and "(empty_captions: 1)" in result.stdout
    words = json.loads((tmp_path / "vocab.json").read_text())["words"]
    assert {"zebra", "grazes", "number"} <= set(words) and "0" not in words  # each number: 5 times
    result = make_shards("index", "--shards", pattern)
    assert result.returncode == 0, result.stderr
    counts = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert counts["num_samples"] == 7 and [s["num_samples"] for s in counts["shards"]] == [3, 3, 1]
    result = make_shards("vocab", "--shards", str(tmp_path / "{5..6}.tar"), "--out", str(tmp_path / "v.json"))
    assert result.returncode == 2 and "--shards pattern" in result.stderr and "matches no file" in result.stderr
