"""Caption tokenisation and the word vocabulary.

The vocabulary is built from training captions, saved as JSON next to the shards and stored inside every
checkpoint, so a checkpoint alone is enough to caption images.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(caption: str) -> list[str]:
    """Lower-cases a caption and splits it into words, dropping punctuation.

    This is the tokenisation used for training targets and for CIDEr-D during validation; the official test
    metrics use the PTB tokenizer instead (see `capline.metrics.coco_eval`).
    """
    return _WORD.findall(caption.lower())


class VocabError(ValueError):
    """A vocabulary file that is missing or malformed."""


class Vocabulary:
    """Maps words to ids and back. Ids 0-3 are `<pad>`, `<start>`, `<end>`, `<unk>`."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabError(f"a vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise VocabError("a vocabulary must not list a word twice")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Builds a vocabulary of every word seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *kept])

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """Returns `[<start>, w1, ..., wn, <end>]`; with `max_len`, at most `max_len` words are kept."""
        words = tokenize(caption)
        if max_len is not None:
            words = words[:max_len]
        return [self.start_id, *(self.index.get(w, self.unk_id) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Turns ids into a caption, stopping at `<end>` or `<pad>` and skipping `<start>`."""
        words = []
        for i in ids:
            i = int(i)
            if i in (self.end_id, self.pad_id):
                break
            if i != self.start_id:
                words.append(self.words[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise VocabError('a vocabulary must be a JSON object {"words": [...]}')
        if not all(isinstance(w, str) for w in data["words"]):
            raise VocabError("every vocabulary entry must be a string")
        return cls(data["words"])

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as JSON, atomically (a reader never sees a half-written file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=0))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise VocabError(f"vocabulary file {str(path)!r} does not exist; make it with capline shards")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VocabError(f"vocabulary file {str(path)!r} is not valid JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except VocabError as err:
            raise VocabError(f"vocabulary file {str(path)!r} is malformed: {err}") from None
