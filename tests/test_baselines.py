"""`tools/baselines.py` on real JPEG shards of a few photos, where every score can be worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PHOTOS = ROOT / "tests" / "fixtures" / "flickr8k-sample"
A, B, C = "1579798212_d30844b4c5", "3484841598_e26ee96aab", "2391812384_7429b5e567"
DOG = "A brown dog runs on grass ."  # 6 words
KIDS = "Two small children swim in water ."  # 6 words, none of them in DOG
BIRD = "Birds fly over the sea ."


def load_tool():
    spec = importlib.util.spec_from_file_location("baselines_tool", ROOT / "tools" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shards(tmp_path: Path, split: str, captions: dict[str, list[str]]) -> str:
    images = tmp_path / f"{split}-images"
    images.mkdir()
    for name in captions:
        shutil.copy(PHOTOS / f"{name}.jpg", images)
    tokens = tmp_path / f"{split}.token.txt"
    tokens.write_text("".join(f"{n}.jpg#{i}\t{c}\n" for n, caps in captions.items() for i, c in enumerate(caps)))
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "capline", "shards", "flickr", "--images", str(images),
               "--captions", str(tokens), "--split", split, "--out", str(out), "--no-progress"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return str(out / f"{split}-000000.tar")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="the official metrics run Java")
def test_constant_and_nearest_neighbour_scores_match_the_hand_computed_ones(tmp_path):
    # Training: photo A says DOG, B says KIDS, C (another photo) says DOG too: DOG is the best constant caption.
    train = shards(tmp_path, "train", {A: [DOG] * 5, B: [KIDS] * 5, C: [DOG, DOG, DOG, BIRD, BIRD]})
    # Test: the photos A and B again, so that each one's nearest training image is itself (cosine 1).
    test = shards(tmp_path, "test", {A: [DOG] * 5, B: [KIDS] * 5})
    config = tmp_path / "encoder.yaml"
    config.write_text("model:\n  encoder:\n    init_args: {model_name: resnet18, img_size: 64, crop_pct: 1.0}\n")
    out = tmp_path / "baselines.json"
    args = ["--config", str(config), "--train-shards", train, "--test-shards", test, "--k", "1", "--out", str(out)]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "baselines.py"), *args], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(out.read_text())
    assert scores["constant"]["caption"] == "a brown dog runs on grass"
    constant = scores["constant"]["scores"]
    # A: the caption is each reference (per-n cosine 1, no length penalty: CIDEr 10); B: no word in common (0).
    assert constant["CIDEr"] == pytest.approx(5.0, abs=1e-6)
    # BLEU over the corpus: half the n-grams of every order match, both hypotheses as long as the references.
    for n in (1, 2, 3, 4):
        assert constant[f"Bleu_{n}"] == pytest.approx(0.5, abs=1e-6)
    retrieved = scores["nearest_neighbour"]
    assert retrieved["captions"] == {"1579798212": DOG, "3484841598": KIDS}
    assert retrieved["scores"]["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert retrieved["scores"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert "nearest_neighbour" in result.stdout and "constant" in result.stdout


def test_consensus_caption_is_the_one_the_others_agree_with():
    tool = load_tool()
    corpus = tool.caption_scorer([[DOG, KIDS], [BIRD, "a cat sleeps on a sofa"], [DOG, "a dog runs"]])
    candidates = ["a cat sleeps", "the dog runs on grass", "a dog runs on grass", "a dog runs on sand", BIRD]
    # "a dog runs on grass" holds the 4-grams of two others ("dog runs on grass", "a dog runs on"); each of those
    # shares one 4-gram with it only
    assert tool.consensus_caption(candidates, corpus) == "a dog runs on grass"
    assert tool.consensus_caption([BIRD, DOG, DOG.lower(), KIDS], corpus) == DOG  # it and its twin agree; ties: first


def test_nearest_neighbours_are_found_by_cosine_similarity():
    tool = load_tool()
    train = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    captions = [[DOG, DOG], [KIDS, KIDS], [BIRD, BIRD]]
    test = torch.tensor([[0.1, 5.0, 0.2], [0.0, 0.1, 0.01], [9.0, 0.0, 1.0]])  # nearest by angle: 1, 1, 0
    assert tool.nearest_neighbour_captions(train, captions, test, k=1) == [KIDS, KIDS, DOG]
