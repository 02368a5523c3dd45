"""SCST's reward: CIDEr-D with `<end>` scored as a word and training-corpus document frequencies."""

from __future__ import annotations

import numpy as np
import torch

from capline.metrics.cider import CiderD, cider_d
from capline.metrics.reward import CiderReward, append_end
from capline.vocab import Vocabulary

WORDS = ["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(12)]]
END, PAD = Vocabulary.end_id, Vocabulary.pad_id


def random_batch(seed: int, images: int = 8, refs: int = 4, length: int = 9):
    """(N, L) candidates (some ended by <end>, some cut at L) and (N, R, L) references without <end>, 0-padded."""
    rng = np.random.default_rng(seed)
    cands = np.zeros((images, length), np.int64)
    references = np.zeros((images, refs, length), np.int64)
    for i in range(images):
        n = int(rng.integers(2, length + 1))
        cands[i, :n] = rng.integers(4, len(WORDS), n)
        if n < length and i % 3:
            cands[i, n] = END
        for r in range(int(rng.integers(1, refs + 1))):
            m = int(rng.integers(3, length + 1))
            references[i, r, :m] = rng.integers(4, 10, m)  # a smaller word range: shared n-grams
    return torch.from_numpy(cands), torch.from_numpy(references)


def words(ids) -> str:
    out = []
    for i in ids:
        if i == PAD:
            break
        out.append(WORDS[i])
        if i == END:
            break
    return " ".join(out)


def test_append_end_marks_the_end_of_every_present_reference():
    refs = np.array([[[5, 6, 0], [0, 0, 0]], [[7, 8, 9], [4, 0, 0]]])
    assert append_end(refs).tolist() == [[[5, 6, END, 0], [0, 0, 0, 0]], [[7, 8, 9, END], [4, END, 0, 0]]]


def test_reward_equals_cider_d_of_the_same_strings_with_end_included():
    cands, refs = random_batch(0)
    # The corpus is the scored batch itself, so corpus document frequencies are cider_d's own.
    corpus = [[[int(t) for t in ref if t] for ref in image if ref[0]] for image in refs.tolist()]
    reward = CiderReward.from_references(corpus)(cands, refs)
    references = {i: [words(r) + " <end>" for r in image if r[0]] for i, image in enumerate(refs.tolist())}
    candidates = {i: words(c) for i, c in enumerate(cands.tolist())}
    assert any(c.endswith("<end>") for c in candidates.values()) and not all(
        c.endswith("<end>") for c in candidates.values()
    )
    _, expected = cider_d(references, candidates)
    assert reward.dtype == torch.float32 and reward.shape == (len(candidates),)
    assert np.allclose(reward.numpy(), [expected[i] for i in range(len(candidates))], atol=1e-5)


def test_reward_uses_the_training_corpus_document_frequencies_and_survives_a_checkpoint(tmp_path):
    cands, refs = random_batch(1)
    _, corpus_refs = random_batch(2, images=40)
    corpus = [[[int(t) for t in ref if t] for ref in image if ref[0]] for image in corpus_refs.tolist()]
    reward = CiderReward.from_references(corpus)
    strings = [[words(r) + " <end>" for r in image] for image in corpus]
    scorer = CiderD.from_references(strings)
    _, expected = scorer.score(
        {i: [words(r) + " <end>" for r in image if r[0]] for i, image in enumerate(refs.tolist())},
        {i: words(c) for i, c in enumerate(cands.tolist())},
    )
    got = reward(cands, refs)
    assert np.allclose(got.numpy(), [expected[i] for i in range(len(expected))], atol=1e-5)
    batch_only = [[[int(t) for t in ref if t] for ref in image if ref[0]] for image in refs.tolist()]
    assert not np.allclose(got.numpy(), CiderReward.from_references(batch_only)(cands, refs).numpy())  # corpus df
    torch.save({"scst_reward": reward.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["scst_reward"]
    assert torch.equal(CiderReward.from_state_dict(state)(cands, refs), got)


def test_end_is_scored_a_caption_cut_before_its_end_scores_less():
    refs = torch.tensor([[[5, 6, 7, 8], [5, 6, 7, 9]]])
    reward = CiderReward.from_references([[[5, 6, 7, 8], [5, 6, 7, 9]], [[4, 5, 10, 11]], [[12, 13]]])
    whole, cut = torch.tensor([[5, 6, 7, 8, END]]), torch.tensor([[5, 6, 7, 8, 0]])
    assert float(reward(whole, refs)) > float(reward(cut, refs))
