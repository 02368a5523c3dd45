"""Pretrained word vectors: a GloVe text file the test writes, `.npy`/`.pt` with a words file, coverage, freezing,
dimension mismatches in one sentence; and through the real `capline fit` (frozen vectors end up in the checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capline.vocab import Vocabulary
from capline.word_vectors import WordVectors, WordVectorsError, apply_word_vectors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def glove(path: Path, words: list[str], dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in words}
    path.write_text("".join(f"{w} {' '.join(f'{v:.6f}' for v in vec)}\n" for w, vec in vectors.items()))
    return {w: np.asarray([float(f"{v:.6f}") for v in vec], dtype=np.float32) for w, vec in vectors.items()}


def test_glove_text_initialises_found_words_and_reports_coverage(tmp_path):
    vocab = Vocabulary.build(["a red cat sits on the mat"], min_count=1)  # 7 words
    vectors = glove(tmp_path / "glove.txt", ["cat", "zebra", "red", "the", "mat"], dim=8)
    embedding = nn.Embedding(len(vocab), 8)
    before = embedding.weight.detach().clone()
    report = apply_word_vectors(embedding, vocab, WordVectors(str(tmp_path / "glove.txt"), freeze=True))
    assert report.startswith("model.word_vectors: 4 of the 7 vocabulary words (57.1%) initialised from glove.txt")
    assert "frozen" in report and not embedding.weight.requires_grad
    for word in ("cat", "red", "the", "mat"):
        assert torch.allclose(embedding.weight[vocab.index[word]], torch.from_numpy(vectors[word]))
    for word in ("a", "sits", "on", "<start>"):
        assert torch.equal(embedding.weight[vocab.index[word]], before[vocab.index[word]])


def test_matrix_with_words_file_and_pt_dict(tmp_path):
    vocab = Vocabulary.build(["a red cat"], min_count=1)
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "vectors.npy", matrix)
    (tmp_path / "words.txt").write_text("red\nzebra\ncat\n")
    embedding = nn.Embedding(len(vocab), 4)
    report = apply_word_vectors(
        embedding, vocab, WordVectors(str(tmp_path / "vectors.npy"), str(tmp_path / "words.txt"))
    )
    assert "2 of the 3 vocabulary words" in report and embedding.weight.requires_grad
    assert embedding.weight[vocab.index["cat"]].tolist() == [8.0, 9.0, 10.0, 11.0]
    torch.save({"words": ["a"], "vectors": torch.ones(1, 4)}, tmp_path / "v.pt")
    apply_word_vectors(embedding, vocab, WordVectors(str(tmp_path / "v.pt")))
    assert embedding.weight[vocab.index["a"]].tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("content", "spec", "message"),
    [
        ("cat 1 2 3\n", {}, "holds 3-dimensional vectors but the decoder's embed_dim is 4; set model.decoder.init_args.embed_dim: 3"),  # noqa: E501
        ("cat 1 2 3 4\nred 1 2\n", {}, "line 2 has 2 values where line 1 has 4"),
        (None, {"path": "missing.txt"}, "'missing.txt' does not exist"),
        ("npy", {}, "set model.word_vectors.words to the text file"),
    ],
)  # fmt: skip
def test_bad_vector_files_fail_in_one_sentence(tmp_path, content, spec, message):
    path = tmp_path / ("v.npy" if content == "npy" else "v.txt")
    if content == "npy":
        np.save(path, np.zeros((2, 4), np.float32))
    elif content is not None:
        path.write_text(content)
    vocab = Vocabulary.build(["a red cat"], min_count=1)
    with pytest.raises(WordVectorsError, match=None) as err:
        apply_word_vectors(nn.Embedding(len(vocab), 4), vocab, WordVectors(**({"path": str(path)} | spec)))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_capline_fit_starts_from_frozen_glove_vectors(tmp_path, synthetic_data):
    words = json.loads(Path(synthetic_data["vocab"]).read_text())["words"][4:]
    vectors = glove(tmp_path / "glove.txt", words[:-3], dim=128)  # the demo's embed_dim; 3 words left out
    glove(tmp_path / "glove50.txt", words, dim=50)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "w"),
        "WANDB_CONFIG_DIR": str(tmp_path / "w"),
    }

    def fit(path: Path) -> subprocess.CompletedProcess:
        args = [
            "--config", str(ROOT / "configs/demo.yaml"), "--data.synthetic", "null",
            "--data.train_shards", synthetic_data["train_shards"], "--data.val_shards", synthetic_data["val_shards"],
            "--data.vocab", synthetic_data["vocab"], "--data.global_batch_size", "8", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.word_vectors.path", str(path), "--model.word_vectors.freeze", "true",
        ]  # fmt: skip
        return subprocess.run(
            [CAPLINE, "fit", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )

    result = fit(tmp_path / "glove.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    coverage = f"model.word_vectors: {len(words) - 3} of the {len(words)} vocabulary words"
    assert coverage in result.stderr and "frozen" in result.stderr
    weights = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["state_dict"][
        "decoder.embed.weight"
    ]
    vocab = Vocabulary.load(synthetic_data["vocab"])
    for word, vector in vectors.items():  # two optimizer steps later: unchanged, being frozen
        assert torch.allclose(weights[vocab.index[word]], torch.from_numpy(vector))
    result = fit(tmp_path / "glove50.txt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("capline: error: ") and "holds 50-dimensional vectors" in message, message
    assert "set model.decoder.init_args.embed_dim: 50" in message
