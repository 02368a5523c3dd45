"""CIDEr-D, vectorised with numpy, equal to pycocoevalcap's `Cider` to 1e-6 and far faster.

pycocoevalcap's `Cider` is CIDEr-D: clipped tf-idf n-gram vectors (n = 1..4), document frequencies counted over
the images being scored, a Gaussian length penalty (sigma 6) and a x10 scale. This module reproduces that code,
including its "length": the number of bigrams (it adds term frequencies when its 0-based order index is 1). That
is the word count minus one, so length differences, and scores, are the same as with word counts.

Every sentence is a sequence of integer token ids; strings are split on whitespace and mapped to ids first. All
sentences of a batch are flattened into one array and n-grams get integer ids by recursive compaction, so the
scoring is a handful of sorts, joins and `np.bincount`s instead of Python dict loops.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
_SEPARATOR = "\x00"  # joins sentences for one fast split; no tokenizer emits it as a word
Sentence = Any  # a whitespace-tokenised str, or a 1-D sequence / array / CPU tensor of int token ids


@dataclass(frozen=True)
class _NGrams:
    """Every n-gram occurrence of a flattened batch of sentences, with batch-local n-gram ids."""

    sentence: np.ndarray  # (O,) sentence of each occurrence
    ngram: np.ndarray  # (O,) n-gram id; order k (0-based) owns ids offsets[k]..offsets[k+1]-1
    keys: list[np.ndarray]  # per order, sorted unique keys: token values, then prefix id * vocab + last-token id
    offsets: np.ndarray  # (n + 1,)


@dataclass(frozen=True)
class _ReferenceStats:
    """Document frequencies precomputed from a reference corpus."""

    keys: list[np.ndarray]
    offsets: np.ndarray
    df: np.ndarray  # (G,) number of corpus images whose references contain each n-gram
    ref_len: float  # log(number of corpus images)


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values, return_inverse=True)` for integers, by the fastest route their range allows."""
    if values.size == 0 or values.min() < 0:
        return np.unique(values, return_inverse=True)
    high = int(values.max())
    if high < 4 * values.size + 1024:  # a lookup table is cheaper than sorting
        present = np.bincount(values) > 0
        return np.flatnonzero(present), (np.cumsum(present) - 1)[values]
    position_bits = values.size.bit_length()
    if high.bit_length() + position_bits > 62:
        return np.unique(values, return_inverse=True)
    # Sorting values with their positions in the low bits replaces the slower argsort inside np.unique.
    packed = np.sort((values << position_bits) | np.arange(values.size))
    sorted_values = packed >> position_bits
    is_first = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    inverse = np.empty(values.size, np.int64)
    inverse[packed & ((1 << position_bits) - 1)] = np.cumsum(is_first) - 1
    return sorted_values[is_first], inverse


def _find(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Returns the index of each value in `sorted_keys`, or -1 where it is absent."""
    if sorted_keys.size == 0:
        return np.full(values.shape, -1)
    index = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
    return np.where(sorted_keys[index] == values, index, -1)


def _find_ngrams(tokens: np.ndarray, lengths: np.ndarray, n: int) -> _NGrams:
    """Finds the 1..n-grams of sentences given as one token array and their lengths."""
    sentence_of_token = np.repeat(np.arange(lengths.size), lengths)
    # Tokens left in the sentence from each position on: an n-gram of length k starts where this is >= k.
    remaining = np.repeat(np.cumsum(lengths), lengths) - np.arange(tokens.size)
    unigram_keys, unigram_ids = _compact(tokens)
    vocab = max(unigram_keys.size, 1)
    keys, sentences, ids = [unigram_keys], [sentence_of_token], [unigram_ids]
    offsets = [0, unigram_keys.size]
    starts, prefix_ids = np.arange(tokens.size), unigram_ids
    for k in range(1, n):
        longer = remaining[starts] > k
        starts = starts[longer]
        # prefix id < number of (k-1)-grams <= tokens.size, so the product stays far below 2**63.
        table, prefix_ids = _compact(prefix_ids[longer] * vocab + unigram_ids[starts + k])
        keys.append(table)
        sentences.append(sentence_of_token[starts])
        ids.append(prefix_ids + offsets[-1])
        offsets.append(offsets[-1] + table.size)
    return _NGrams(np.concatenate(sentences), np.concatenate(ids), keys, np.asarray(offsets))


def _pack(fields: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Packs non-negative int fields, (values, upper bound) each, into one int64 that sorts like the tuple."""
    bits = [bound.bit_length() for _, bound in fields]
    if sum(bits) > 62:
        sizes = ", ".join(str(bound) for _, bound in fields)
        raise ValueError(f"a batch this large ({sizes}) cannot be scored at once; score it in parts")
    packed = np.zeros(fields[0][0].shape, np.int64)
    for (values, _), width in zip(fields, bits):
        packed = (packed << width) | values
    return packed


def _corpus_document_frequency(ngrams: _NGrams, stats: _ReferenceStats) -> np.ndarray:
    """Looks the batch's n-grams up in a corpus; an n-gram with an unseen prefix or token is unseen too."""
    corpus_vocab = max(stats.keys[0].size, 1)
    unigram = _find(stats.keys[0], ngrams.keys[0])
    found = [unigram]
    for k in range(1, len(ngrams.keys)):
        prefix, last = np.divmod(ngrams.keys[k], max(ngrams.keys[0].size, 1))
        corpus_prefix, corpus_last = found[-1][prefix], unigram[last]
        index = _find(stats.keys[k], corpus_prefix * corpus_vocab + corpus_last)
        found.append(np.where((corpus_prefix >= 0) & (corpus_last >= 0), index, -1))
    corpus_ids = np.concatenate([ids + stats.offsets[k] for k, ids in enumerate(found)])
    return np.where(np.concatenate(found) >= 0, stats.df[corpus_ids], 0)


def _reference_stats(tokens: np.ndarray, lengths: np.ndarray, image: np.ndarray, n: int) -> _ReferenceStats:
    """Counts, for every n-gram of the references, the number of images whose references contain it."""
    ngrams = _find_ngrams(tokens, lengths, n)
    num_ngrams, num_images = int(ngrams.offsets[-1]), int(image.max(initial=0)) + 1
    pairs = np.sort(_pack([(image[ngrams.sentence], num_images), (ngrams.ngram, num_ngrams)]))
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]  # np.unique's hashing is far slower here
    df = np.bincount(pairs & ((1 << num_ngrams.bit_length()) - 1), minlength=max(num_ngrams, 1))
    return _ReferenceStats(ngrams.keys, ngrams.offsets, df, float(np.log(num_images)))


@dataclass(frozen=True)
class _TermFrequencies:
    """Term frequencies of the distinct (image, n-gram, sentence) triples of a batch, sorted in that order.

    Candidates have the lowest sentence indices, so each (image, n-gram) group starts with the candidate's entry
    (when the candidate has that n-gram), followed by the entries of the image's references: document
    frequencies and the candidate-reference join need no further sorting or searching.
    """

    sentence: np.ndarray  # (E,)
    ngram: np.ndarray  # (E,)
    order: np.ndarray  # (E,) n-gram length minus one
    count: np.ndarray  # (E,)
    group_first: np.ndarray  # (E,) index of the first entry of the same (image, n-gram)
    group_last: np.ndarray  # (E,) bool: the entry ends its (image, n-gram) group


def _term_frequencies(ngrams: _NGrams, image: np.ndarray) -> _TermFrequencies:
    """Counts each n-gram per sentence with one sort of packed (image, n-gram, sentence) keys."""
    num_ngrams, num_sentences = int(ngrams.offsets[-1]), image.size
    num_images = int(image.max(initial=0)) + 1
    fields = [(image[ngrams.sentence], num_images), (ngrams.ngram, num_ngrams), (ngrams.sentence, num_sentences)]
    packed, count = np.unique(_pack(fields), return_counts=True)
    group = packed >> num_sentences.bit_length()
    ngram = group & ((1 << num_ngrams.bit_length()) - 1)
    new_group = np.concatenate([[True], group[1:] != group[:-1]])
    first = np.flatnonzero(new_group)
    return _TermFrequencies(
        sentence=packed & ((1 << num_sentences.bit_length()) - 1),
        ngram=ngram,
        order=np.repeat(np.arange(ngrams.offsets.size - 1), np.diff(ngrams.offsets))[ngram],
        count=count,
        group_first=np.repeat(first, np.diff(np.append(first, group.size))),
        group_last=np.append(new_group[1:], True),
    )


def _score_flat(
    tokens: np.ndarray,
    lengths: np.ndarray,
    ref_image: np.ndarray,
    n: int,
    sigma: float,
    stats: _ReferenceStats | None = None,
) -> np.ndarray:
    """Scores I candidates against their references, all flattened into one token array.

    Args:
        tokens: (T,) int64 tokens of the I candidates (image i's first) followed by the R references.
        lengths: (I + R,) number of tokens of each sentence.
        ref_image: (R,) image index (0..I-1) of each reference; every image needs at least one.
        n: Longest n-gram.
        sigma: Standard deviation of the Gaussian length penalty.
        stats: Corpus document frequencies; None counts them over these references.

    Returns:
        (I,) CIDEr-D score of each candidate.
    """
    num_images, num_sentences = lengths.size - ref_image.size, lengths.size
    ngrams = _find_ngrams(tokens, lengths, n)
    tf = _term_frequencies(ngrams, np.concatenate([np.arange(num_images), ref_image]))
    is_candidate = tf.sentence < num_images
    if stats is None:  # df: (image, n-gram) groups that end in a reference
        df = np.bincount(tf.ngram[tf.group_last & ~is_candidate], minlength=max(int(ngrams.offsets[-1]), 1))
        ref_len = np.log(float(num_images))
    else:
        df, ref_len = _corpus_document_frequency(ngrams, stats), stats.ref_len
    log_df = np.zeros(df.shape)
    np.log(df, out=log_df, where=df > 1)  # log(max(1, df)) is 0 for all but a few n-grams
    weight = tf.count * (ref_len - log_df)[tf.ngram]
    cell = tf.sentence * n + tf.order  # (E,) flat index into (sentence, order)
    norm = np.sqrt(np.bincount(cell, weights=weight**2, minlength=num_sentences * n)).reshape(-1, n)

    # Clipped dot products: a reference entry meets its image's candidate entry at the start of its group.
    hit = ~is_candidate & is_candidate[tf.group_first]
    ref_weight, hyp_weight = weight[hit], weight[tf.group_first[hit]]
    dot = np.bincount(
        cell[hit], weights=np.minimum(hyp_weight, ref_weight) * ref_weight, minlength=num_sentences * n
    ).reshape(-1, n)[num_images:]  # (R, n)

    denominator = norm[ref_image] * norm[num_images:]
    cosine = np.divide(dot, denominator, out=dot.astype(np.float64), where=denominator != 0)  # int when no hits
    bigrams = np.maximum(lengths - 1, 0)  # the reference code's "length"; an empty sentence scores 0 anyway
    delta = (bigrams[ref_image] - bigrams[num_images:]).astype(np.float64)
    per_ref = cosine.sum(axis=1) * np.exp(-(delta**2) / (2 * sigma**2))
    num_refs = np.bincount(ref_image, minlength=num_images)
    return np.bincount(ref_image, weights=per_ref, minlength=num_images) / (n * num_refs) * 10.0


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd: spreads words over the top bits
_ASCII_SPACE = np.array([chr(c).isspace() for c in range(256)])  # what str.split() splits on, for ASCII


def _encode_ascii(sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact word ids of ASCII sentences without a Python object per word; None when this route does not apply.

    Words (runs of non-space bytes, as str.split() finds them) become zero-padded byte rows. A hash of each row
    groups equal words, then every word is compared byte by byte with its group's representative: a hash
    collision sends the batch to the dictionary route instead of merging two words.
    """
    text = _SEPARATOR.join(sentences)
    if not text.isascii() or text.count(_SEPARATOR) != len(sentences) - 1:
        return None
    chars = np.frombuffer(text.encode("ascii"), np.uint8)
    in_word = ~_ASCII_SPACE[chars] & (chars != 0)
    edges = np.diff(np.concatenate([[False], in_word, [False]]).view(np.int8))
    starts, word_lengths = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    width = 8 * -(-int(word_lengths.max(initial=1)) // 8)
    if width > 64:
        return None
    rows = np.zeros((starts.size, width), np.uint8)  # (W, width)
    shift = np.arange(starts.size) * width - starts  # text position -> row-major position in `rows`
    rows.reshape(-1)[np.flatnonzero(in_word) + np.repeat(shift, word_lengths)] = chars[in_word]
    chunks = rows.view(np.uint64)  # (W, width / 8): a word is exactly its chunks
    key = np.zeros(starts.size, np.uint64)
    for c in range(chunks.shape[1]):
        key = (key ^ chunks[:, c]) * _HASH_MULTIPLIER
    # The top bits of a multiplicative hash; short enough for _compact's fast route, collisions are caught below.
    _, ids = _compact((key >> np.uint64(64 - 62 + starts.size.bit_length())).astype(np.int64))
    representative = np.empty(ids.max(initial=-1) + 1, np.int64)
    representative[ids] = np.arange(ids.size)
    if not np.array_equal(chunks[representative[ids]], chunks):
        return None
    words_before = np.searchsorted(starts, np.flatnonzero(chars == 0))  # words before each sentence separator
    return ids, np.diff(np.concatenate([[0], words_before, [starts.size]]))


def _encode_words(sentences: Sequence[str], vocab: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Splits strings on whitespace and maps words to ids; words missing from `vocab` get fresh ids."""
    encoded = None if vocab else _encode_ascii(sentences)
    if encoded is not None:
        return encoded
    # One split of all sentences joined by a separator word is twice as fast as a split per sentence.
    words = f" {_SEPARATOR} ".join(sentences).split()
    mapping, next_id = {_SEPARATOR: -1}, len(vocab)
    for word in dict.fromkeys(words):
        if word not in mapping:
            mapping[word] = vocab.get(word, next_id)
            next_id += word not in vocab
    ids = np.fromiter(map(mapping.__getitem__, words), dtype=np.int64, count=len(words))
    ends = np.append(np.flatnonzero(ids == -1), ids.size)
    if ends.size != len(sentences):  # a sentence held the separator itself
        return _encode_ids([np.array([mapping[w] for w in s.split()], np.int64) for s in sentences])
    return ids[ids != -1], np.diff(ends, prepend=-1) - 1


def _encode_ids(sentences: Sequence[Sentence]) -> tuple[np.ndarray, np.ndarray]:
    """Flattens 1-D integer sequences into one token array and their lengths."""
    arrays = []
    for sentence in sentences:
        array = np.asarray(sentence)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise TypeError(f"a sentence must be a string or a 1-D sequence of int token ids, got {sentence!r:.80}")
        arrays.append(array)
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    tokens = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return tokens, lengths


class CiderD:
    """Reusable CIDEr-D scorer, optionally with document frequencies precomputed from a reference corpus.

    `CiderD().score(refs, cands)` equals pycocoevalcap's `Cider` (df counted over the scored images).
    `CiderD.from_references(train_refs)` fixes df and ref_len to a corpus, as self-critical training does, so
    small batches are scored against corpus statistics.

    Args:
        n: Longest n-gram. pycocoevalcap only supports 4; other values generalise it (mean over orders 1..n).
        sigma: Standard deviation of the Gaussian length penalty.
    """

    def __init__(self, n: int = 4, sigma: float = 6.0):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.n, self.sigma = n, float(sigma)
        self._stats: _ReferenceStats | None = None
        self._vocab: dict[str, int] = {}  # word ids of the corpus, when it was given as strings
        self._kind: str | None = None  # "str" or "ids": what the corpus held; batches must match it

    @classmethod
    def from_references(
        cls, references: Mapping[Any, Sequence[Sentence]] | Iterable[Sequence[Sentence]], n: int = 4, sigma: float = 6.0
    ) -> CiderD:
        """Builds a scorer whose df and ref_len come from a corpus, e.g. all training references.

        Args:
            references: Per image, its reference sentences (strings or token ids); a mapping's values are used.
            n: Longest n-gram.
            sigma: Standard deviation of the Gaussian length penalty.

        Returns:
            A `CiderD` whose `score` uses the corpus document frequencies.
        """
        scorer = cls(n=n, sigma=sigma)
        groups = [list(refs) for refs in (references.values() if isinstance(references, Mapping) else references)]
        if not groups:
            raise ValueError("from_references needs at least one image's references")
        sentences = list(chain.from_iterable(groups))
        scorer._kind = _kind_of(sentences)
        if scorer._kind == "str":
            words = dict.fromkeys(chain.from_iterable(s.split() for s in sentences))
            scorer._vocab = {w: i for i, w in enumerate(words)}
            tokens, lengths = _encode_words(sentences, scorer._vocab)
        else:
            tokens, lengths = _encode_ids(sentences)
        image = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        scorer._stats = _reference_stats(tokens, lengths, image, n)
        return scorer

    def score(
        self, references: Mapping[K, Sequence[Sentence]], candidates: Mapping[K, Sentence]
    ) -> tuple[float, dict[K, float]]:
        """Scores each candidate against the references of the same key.

        Args:
            references: Key -> reference sentences (at least one); keys absent from `candidates` are ignored.
            candidates: Key -> one candidate sentence; these keys are scored.

        Returns:
            The corpus score (mean over candidates) and the score of each candidate key.
        """
        keys = list(candidates)
        if not keys:
            raise ValueError("there are no candidates to score")
        groups = [_references_of(references, key) for key in keys]
        sentences = [candidates[k] for k in keys] + list(chain.from_iterable(groups))
        tokens, lengths = self._encode(sentences)
        ref_image = np.repeat(np.arange(len(keys)), [len(g) for g in groups])
        scores = _score_flat(tokens, lengths, ref_image, self.n, self.sigma, self._stats)
        return float(np.mean(scores)), dict(zip(keys, scores.tolist()))

    def score_padded(self, candidates: np.ndarray, references: np.ndarray, pad_id: int = 0) -> np.ndarray:
        """Scores padded token-id arrays, the layout a training step holds (row b is one image).

        A sentence ends at its first `pad_id`; a reference row that starts with `pad_id` is absent. Without a
        corpus, df is counted over the B rows, so each row must be a distinct image to match `cider_d`.

        Args:
            candidates: (B, Lc) int token ids.
            references: (B, R, Lr) int token ids; every row needs at least one reference.
            pad_id: Padding id.

        Returns:
            (B,) CIDEr-D scores.
        """
        if self._kind == "str":
            raise TypeError("this CiderD was built from string references; score token ids with an id-based corpus")
        candidates, references = np.asarray(candidates), np.asarray(references)
        if candidates.ndim != 2 or references.ndim != 3 or references.shape[0] != candidates.shape[0]:
            raise ValueError(
                f"expected (B, Lc) candidates and (B, R, Lr) references, got {candidates.shape} and {references.shape}"
            )
        cand_tokens, cand_lengths = _unpad(candidates, pad_id)
        ref_tokens, ref_lengths = _unpad(references.reshape(-1, references.shape[-1]), pad_id)
        present = ref_lengths > 0
        ref_image = np.repeat(np.arange(candidates.shape[0]), references.shape[1])[present]
        if np.bincount(ref_image, minlength=candidates.shape[0]).min(initial=1) == 0:
            raise ValueError("every row needs at least one reference that is not all padding")
        tokens = np.concatenate([cand_tokens, ref_tokens]).astype(np.int64)
        lengths = np.concatenate([cand_lengths, ref_lengths[present]])
        return _score_flat(tokens, lengths, ref_image, self.n, self.sigma, self._stats)

    def state_dict(self) -> dict:
        """The corpus statistics of an id-based scorer as tensors (a checkpoint holds them with weights_only)."""
        import torch

        if self._stats is None or self._kind == "str":
            raise TypeError("only a CiderD built from_references of token ids has a state to save")
        stats = self._stats
        return {
            "n": self.n, "sigma": self.sigma, "ref_len": stats.ref_len, "offsets": torch.from_numpy(stats.offsets),
            "df": torch.from_numpy(stats.df), "keys": [torch.from_numpy(k) for k in stats.keys],
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict) -> CiderD:
        """The scorer whose `state_dict()` this is."""
        scorer = cls(n=int(state["n"]), sigma=float(state["sigma"]))
        keys = [np.asarray(k, np.int64) for k in state["keys"]]  # CPU tensors convert without a copy
        offsets, df = np.asarray(state["offsets"], np.int64), np.asarray(state["df"], np.int64)
        scorer._stats = _ReferenceStats(keys, offsets, df, float(state["ref_len"]))
        scorer._kind = "ids"
        return scorer

    def _encode(self, sentences: list[Sentence]) -> tuple[np.ndarray, np.ndarray]:
        kind = _kind_of(sentences)
        if self._kind is not None and kind != self._kind:
            raise TypeError(f"this CiderD's corpus holds {self._kind} sentences but the batch holds {kind} sentences")
        return _encode_words(sentences, self._vocab) if kind == "str" else _encode_ids(sentences)


def _unpad(rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the tokens before each row's first `pad_id`, concatenated, and the number kept per row."""
    ends = np.concatenate([rows == pad_id, np.ones((rows.shape[0], 1), bool)], axis=1)  # a row without pad ends
    lengths = ends.argmax(axis=1)
    return rows[np.arange(rows.shape[1]) < lengths[:, None]], lengths


def _references_of(references: Mapping[K, Sequence[Sentence]], key: K) -> list[Sentence]:
    if key not in references:
        raise KeyError(f"candidate key {key!r} has no references")
    refs = references[key]
    if isinstance(refs, str) or len(refs) == 0:
        raise ValueError(f"the references of key {key!r} must be a non-empty list of sentences, got {refs!r:.80}")
    return list(refs)


def _kind_of(sentences: list[Sentence]) -> str:
    """'str' when every sentence is a string, 'ids' when none is; mixing them is an error."""
    num_strings = sum(isinstance(s, str) for s in sentences)
    if 0 < num_strings < len(sentences):
        raise TypeError("sentences must be all strings or all token id sequences, not a mix")
    return "str" if num_strings else "ids"


def cider_d(
    references: Mapping[K, Sequence[Sentence]], candidates: Mapping[K, Sentence], *, n: int = 4, sigma: float = 6.0
) -> tuple[float, dict[K, float]]:
    """CIDEr-D of tokenised candidates, equal to pycocoevalcap `Cider().compute_score(refs, {k: [cand]})`.

    Document frequencies come from the references of the scored images (the keys of `candidates`).

    Args:
        references: Key -> reference sentences: whitespace-tokenised strings or token-id sequences.
        candidates: Key -> one candidate sentence of the same kind.
        n: Longest n-gram.
        sigma: Standard deviation of the Gaussian length penalty.

    Returns:
        The corpus score (mean of the per-image scores) and each key's score.
    """
    return CiderD(n=n, sigma=sigma).score(references, candidates)
