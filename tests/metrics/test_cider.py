"""`cider_d` and `CiderD` against pycocoevalcap's `Cider`, the reference implementation, to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from capline.metrics import cider as cider_module
from capline.metrics.cider import CiderD, _compact, cider_d

TOLERANCE = 1e-6


def reference_cider(references: dict, candidates: dict) -> tuple[float, dict]:
    """pycocoevalcap's CIDEr-D on the candidates' keys."""
    keys = list(candidates)
    score, scores = Cider().compute_score({k: references[k] for k in keys}, {k: [candidates[k]] for k in keys})
    return float(score), dict(zip(keys, scores.tolist()))


def assert_matches_reference(references: dict, candidates: dict) -> tuple[float, dict]:
    ours, ours_per_image = cider_d(references, candidates)
    theirs, theirs_per_image = reference_cider(references, candidates)
    assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert list(ours_per_image) == list(candidates)
    np.testing.assert_allclose(list(ours_per_image.values()), list(theirs_per_image.values()), rtol=0, atol=TOLERANCE)
    return theirs, theirs_per_image


def random_corpus(seed: int, num_images: int = 60, vocab: int = 40) -> tuple[dict, dict]:
    """A small vocabulary (many shared and repeated n-grams), 1-7 references per image, captions of 0-14 words;
    some candidates are empty, one word long, or use words no reference has."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)] + ["unseen", "novel"]

    def sentence(low: int, high: int, pool: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, pool, rng.integers(low, high + 1)))

    references = {f"img{i}": [sentence(1, 14, vocab) for _ in range(rng.integers(1, 8))] for i in range(num_images)}
    candidates = {key: sentence(0, 14, vocab + 2) for key in references}
    keys = list(candidates)
    candidates[keys[0]], candidates[keys[1]] = "", words[3]
    candidates[keys[2]] = references[keys[2]][0]  # an exact copy of a reference
    return references, candidates


@pytest.mark.parametrize("seed", range(5))
def test_random_corpora_match_pycocoevalcap(seed):
    references, candidates = random_corpus(seed)
    theirs, per_image = assert_matches_reference(references, candidates)
    assert theirs > 0.1  # the comparison is not between two vectors of zeros
    assert per_image[list(candidates)[0]] == 0.0  # the empty candidate


@pytest.mark.parametrize(
    "candidates",
    [
        {"a": "", "b": "a dog runs", "c": "cat"},  # empty and one-word candidates
        {"a": "a a a a a a", "b": "dog dog dog runs runs", "c": "the the cat cat the the cat"},  # repeated n-grams
        {"a": "zebra giraffe", "b": "quantum flux capacitor", "c": "a cat"},  # n-grams absent from all references
        {"a": "a cat sits on a mat", "b": "a dog runs on the grass", "c": "the cat sleeps"},  # exact copies
    ],
)
def test_edge_cases_match_pycocoevalcap(candidates):
    references = {
        "a": ["a cat sits on a mat", "a cat on a mat", "the cat is sitting"],  # 3 references
        "b": ["a dog runs on the grass"],  # 1 reference
        "c": ["the cat sleeps", "a cat sleeps on the bed", "a sleeping cat", "cat cat cat", "the the cat"],  # 5
    }
    assert_matches_reference(references, candidates)


def test_single_image_scores_zero_like_pycocoevalcap():
    # ref_len = log(1) = 0 zeroes every tf-idf weight.
    references, candidates = {7: ["a cat on a mat", "a cat"]}, {7: "a cat on a mat"}
    assert reference_cider(references, candidates)[0] == 0.0
    assert cider_d(references, candidates) == (0.0, {7: 0.0})


def test_length_penalty_is_a_gaussian_of_the_length_difference():
    references = {0: ["a b c d e f g h"], 1: ["x y z"], 2: ["p q r s"]}
    candidates = {0: "a b c d", 1: "x y z", 2: "p q"}  # image 0: 4 words against 8, a difference of 4
    penalised = cider_d(references, candidates)[1][0]
    unpenalised = cider_d(references, candidates, sigma=1e9)[1][0]
    assert penalised / unpenalised == pytest.approx(np.exp(-(4**2) / (2 * 6.0**2)), rel=1e-12)
    assert_matches_reference(references, candidates)


def test_token_ids_score_like_the_strings_they_encode():
    references, candidates = random_corpus(seed=11, num_images=30)
    expected = cider_d(references, candidates)
    words = sorted({w for refs in references.values() for r in refs for w in r.split()} | {"unseen", "novel"})
    word_id = {w: 1_000_003 * (i + 1) for i, w in enumerate(words)}  # sparse, large, like hashed OOV ids
    containers = [list, tuple, lambda ids: np.array(ids, np.int64), lambda ids: torch.tensor(ids, dtype=torch.long)]
    for container in containers:

        def encode(sentence: str, container=container):
            return container([word_id[w] for w in sentence.split()])

        refs = {k: [encode(r) for r in v] for k, v in references.items()}
        score, per_image = cider_d(refs, {k: encode(c) for k, c in candidates.items()})
        assert score == pytest.approx(expected[0], abs=1e-12)
        np.testing.assert_allclose(list(per_image.values()), list(expected[1].values()), atol=1e-12)


@pytest.mark.parametrize("accent", ["é", "e"])  # non-ASCII text takes the dictionary route, ASCII the byte route
def test_unusual_whitespace_splits_like_str_split(accent):
    references = {
        0: [f"un caf{accent}\tnoir", f"caf{accent} au  lait"],
        1: ["tab\x0bseparated  words\x1cand more", "words and more"],
        2: ["plain words here", "more plain words\n"],
    }
    candidates = {0: f"un caf{accent} noir", 1: "tab separated\x1fwords and", 2: " plain words"}
    assert_matches_reference(references, candidates)


def test_words_longer_than_the_fast_route_allows_still_match():
    long_word = "x" * 70
    references = {0: [f"{long_word} a b", "a b c"], 1: ["c d e", "d e f"], 2: ["a c e", long_word]}
    assert_matches_reference(references, {0: f"{long_word} a", 1: "d e", 2: long_word})


def test_hash_collisions_fall_back_to_exact_word_ids(monkeypatch):
    references, candidates = random_corpus(seed=9, num_images=10)
    expected = cider_d(references, candidates)
    monkeypatch.setattr(cider_module, "_HASH_MULTIPLIER", np.uint64(0))  # every word hashes to 0
    assert cider_module._encode_ascii(["a b", "b c"]) is None
    score, per_image = cider_d(references, candidates)
    assert score == pytest.approx(expected[0], abs=1e-12)
    np.testing.assert_allclose(list(per_image.values()), list(expected[1].values()), atol=1e-12)


def test_a_separator_character_inside_a_sentence_is_an_ordinary_word():
    references = {0: ["a \x00 b", "a b"], 1: ["c d", "d \x00"], 2: ["e f", "f g"]}
    assert_matches_reference(references, {0: "a \x00", 1: "c \x00 d", 2: "e"})


def test_only_candidate_keys_are_scored_and_extra_references_ignored():
    references, candidates = random_corpus(seed=3, num_images=20)
    subset = {k: candidates[k] for k in list(candidates)[5:12]}
    score, per_image = assert_matches_reference(references, subset)
    assert list(cider_d(references, subset)[1]) == list(subset)
    assert cider_d({k: references[k] for k in subset}, subset)[0] == pytest.approx(score, abs=1e-12)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(KeyError, match="'missing'"):
        cider_d({"a": ["x y"]}, {"a": "x", "missing": "y"})
    with pytest.raises(ValueError, match="'a'.*non-empty"):
        cider_d({"a": []}, {"a": "x"})
    with pytest.raises(ValueError, match="no candidates"):
        cider_d({"a": ["x"]}, {})
    with pytest.raises(TypeError, match="not a mix"):
        cider_d({"a": ["x y"]}, {"a": [1, 2]})
    with pytest.raises(TypeError, match="1-D sequence of int token ids"):
        cider_d({"a": [[1.5, 2.0]]}, {"a": [1, 2]})
    with pytest.raises(ValueError, match="positive"):
        CiderD(n=0)


def corpus_reference_scores(corpus: dict, batch_refs: dict, batch_cands: dict) -> list[float]:
    """pycocoevalcap's per-image CIDEr-D of a batch with df and ref_len taken from `corpus`.

    CiderScorer counts df over its own images and sets ref_len = log(number of its images), so it gets the
    corpus df injected and is padded with throwaway images up to the corpus size.
    """
    corpus_scorer = CiderScorer()
    for refs in corpus.values():
        corpus_scorer += (None, refs)
    corpus_scorer.compute_doc_freq()
    scorer = CiderScorer()
    for key in batch_cands:
        scorer += (batch_cands[key], batch_refs[key])
    for _ in range(len(corpus) - len(batch_cands)):
        scorer += ("pad", ["pad"])
    scorer.document_frequency = corpus_scorer.document_frequency
    return scorer.compute_cider()[: len(batch_cands)]


def test_precomputed_df_scores_batches_like_pycocoevalcap_with_corpus_df():
    corpus, _ = random_corpus(seed=5, num_images=40)
    batch_refs, batch_cands = random_corpus(seed=6, num_images=8, vocab=60)  # n-grams the corpus lacks, too
    scorer = CiderD.from_references(corpus)
    score, per_image = scorer.score(batch_refs, batch_cands)
    expected = corpus_reference_scores(corpus, batch_refs, batch_cands)
    np.testing.assert_allclose(list(per_image.values()), expected, atol=TOLERANCE)
    assert score == pytest.approx(np.mean(expected), abs=TOLERANCE)
    assert max(expected) > 0.1


def test_precomputed_df_of_the_scored_corpus_equals_cider_d_in_any_batching():
    references, candidates = random_corpus(seed=8, num_images=50)
    _, full = cider_d(references, candidates)
    scorer = CiderD.from_references(list(references.values()))
    keys = list(candidates)
    for start in range(0, len(keys), 7):
        batch = keys[start : start + 7]
        _, per_image = scorer.score(references, {k: candidates[k] for k in batch})
        np.testing.assert_allclose([per_image[k] for k in batch], [full[k] for k in batch], atol=1e-12)


def test_score_padded_matches_cider_d_on_token_ids():
    rng = np.random.default_rng(4)
    num_images, num_refs, length = 12, 4, 9
    candidates = rng.integers(3, 30, (num_images, length))
    candidates[:, 6:] = 0  # padding
    candidates[0, :] = 0  # empty caption
    references = rng.integers(3, 30, (num_images, num_refs, length))
    references[:, :, 7:] = 0
    references[:4, 2:] = 0  # the first images have 2 references only
    per_row = CiderD().score_padded(candidates, references, pad_id=0)

    def unpad(row: np.ndarray) -> list[int]:
        return row[: np.argmax(row == 0)].tolist() if (row == 0).any() else row.tolist()

    refs = {i: [unpad(r) for r in references[i] if r[0] != 0] for i in range(num_images)}
    cands = {i: unpad(candidates[i]) for i in range(num_images)}
    np.testing.assert_allclose(per_row, list(cider_d(refs, cands)[1].values()), atol=1e-12)
    text_refs = {i: [" ".join(map(str, r)) for r in v] for i, v in refs.items()}
    theirs = reference_cider(text_refs, {i: " ".join(map(str, c)) for i, c in cands.items()})
    np.testing.assert_allclose(per_row, list(theirs[1].values()), atol=TOLERANCE)


def test_string_corpus_refuses_token_ids():
    scorer = CiderD.from_references([["a cat", "a dog"]])
    with pytest.raises(TypeError, match="str sentences"):
        scorer.score({0: [[1, 2]]}, {0: [1]})


@pytest.mark.parametrize(
    "values",
    [
        np.array([5, 3, 5, 9, 3]),  # lookup table
        np.array([2**40, 3, 2**40 + 1, 3]),  # packed sort
        np.array([-4, 10**15, 7, -4]),  # np.unique: negative values
        np.arange(200_000) * 10**12,  # np.unique: values and positions need more than 62 bits
    ],
)
def test_compact_equals_np_unique_on_every_route(values):
    table, inverse = _compact(values)
    expected_table, expected_inverse = np.unique(values, return_inverse=True)
    np.testing.assert_array_equal(table, expected_table)
    np.testing.assert_array_equal(inverse, expected_inverse)


sentences = st.lists(st.sampled_from(["a", "b", "c", "dog", "the"]), max_size=7).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(sentences, min_size=1, max_size=4), sentences), min_size=1, max_size=6))
def test_property_any_small_corpus_matches_pycocoevalcap(images):
    references = {i: refs for i, (refs, _) in enumerate(images)}
    candidates = {i: cand for i, (_, cand) in enumerate(images)}
    # pycocoevalcap itself fails (max() of no document frequencies) when no reference has a word.
    assume(any(r.split() for refs in references.values() for r in refs))
    assert_matches_reference(references, candidates)
