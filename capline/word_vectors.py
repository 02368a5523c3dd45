"""Pretrained word vectors (GloVe) as the decoder's initial word embeddings.

    model:
      word_vectors:
        path: glove.6B.300d.txt   # GloVe's text format: `word v1 ... vD` per line
        freeze: true              # keep the embeddings fixed while training

A `.npy` or `.pt` matrix works too, with `words` naming a text file of its rows' words (one per line); a `.pt`
may instead hold `{"words": [...], "vectors": tensor}`. Vocabulary words found get their vector; the others and
the special tokens keep their random initialisation. The coverage is reported when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capline.vocab import SPECIAL_TOKENS, VocabError, Vocabulary


class WordVectorsError(VocabError):
    """A word-vectors file that is missing, malformed, or of another dimension than the embeddings."""


@dataclass
class WordVectors:
    """Where the vectors are and whether they stay fixed."""

    path: str  # GloVe text file, or a .npy / .pt matrix (one row per word)
    words: str | None = None  # .npy / .pt: text file with row i's word on line i
    freeze: bool = False  # no gradient for the embeddings (requires_grad=False before DDP wraps the model)


def _read_glove(path: Path, wanted: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """The vectors of the wanted words, and the file's dimension; a line of another length is an error."""
    vectors, dim = {}, None
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            word, _, values = line.rstrip("\n").partition(" ")
            if number == 1 and len(values.split()) == 1 and word.isdigit():
                continue  # word2vec's "count dim" header line
            count = values.count(" ") + 1 if values else 0
            if dim is None:
                dim = count
            if count != dim or not word:
                raise WordVectorsError(
                    f"model.word_vectors.path {str(path)!r} line {number} has {count} values where line 1 has {dim}; "
                    f"expected GloVe's text format 'word v1 ... vD'"
                )
            if word in wanted:
                vectors[word] = np.asarray(values.split(), dtype=np.float32)
    if dim is None:
        raise WordVectorsError(f"model.word_vectors.path {str(path)!r} is empty")
    return vectors, dim


def _read_matrix(path: Path, words_file: str | None) -> tuple[list[str], np.ndarray]:
    if path.suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, dict) and "words" in loaded and "vectors" in loaded:
            return list(loaded["words"]), np.asarray(loaded["vectors"], dtype=np.float32)
        matrix = np.asarray(loaded, dtype=np.float32)
    else:
        matrix = np.load(path).astype(np.float32)
    if words_file is None or not Path(words_file).is_file():
        raise WordVectorsError(
            f"model.word_vectors.path {str(path)!r} is a matrix: set model.word_vectors.words to the text file of its "
            f"rows' words (one per line)"
        )
    words = Path(words_file).read_text(encoding="utf-8").splitlines()
    if matrix.ndim != 2 or len(words) != matrix.shape[0]:
        raise WordVectorsError(
            f"model.word_vectors: {words_file!r} lists {len(words)} words but {str(path)!r} has shape "
            f"{tuple(matrix.shape)}; give one word per row"
        )
    return words, matrix


def load_word_vectors(spec: WordVectors, vocab: Vocabulary, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the vocabulary: `(vectors (V, D), found (V,) bool)`.

    Raises:
        WordVectorsError: If the file is missing or malformed, or its dimension is not `embed_dim`.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise WordVectorsError(f"model.word_vectors.path {spec.path!r} does not exist")
    wanted = set(vocab.words[len(SPECIAL_TOKENS) :])
    if path.suffix in (".npy", ".pt"):
        words, matrix = _read_matrix(path, spec.words)
        table, dim = {w: matrix[i] for i, w in enumerate(words) if w in wanted}, matrix.shape[1]
    else:
        table, dim = _read_glove(path, wanted)
    if dim != embed_dim:
        raise WordVectorsError(
            f"model.word_vectors.path {spec.path!r} holds {dim}-dimensional vectors but the decoder's embed_dim is "
            f"{embed_dim}; set model.decoder.init_args.embed_dim: {dim}"
        )
    vectors = torch.zeros(len(vocab), dim)
    found = torch.zeros(len(vocab), dtype=torch.bool)
    for index, word in enumerate(vocab.words):
        if word in table:
            vectors[index] = torch.from_numpy(table[word])
            found[index] = True
    return vectors, found


def apply_word_vectors(embedding: nn.Embedding, vocab: Vocabulary, spec: WordVectors) -> str:
    """Copies the vectors of the vocabulary's words into `embedding` (and freezes it if asked); returns the
    coverage in words."""
    vectors, found = load_word_vectors(spec, vocab, embedding.embedding_dim)
    with torch.no_grad():
        embedding.weight[found] = vectors[found].to(embedding.weight)
    if spec.freeze:
        embedding.weight.requires_grad_(False)
    words = len(vocab) - len(SPECIAL_TOKENS)
    count = int(found.sum())
    return (
        f"model.word_vectors: {count} of the {words} vocabulary words ({100 * count / max(words, 1):.1f}%) "
        f"initialised from {Path(spec.path).name}{', frozen' if spec.freeze else ''}; the others keep random vectors"
    )
