from functools import partial

import pytest
import torch

from capline.models import AttentionDecoder, ShowTellDecoder, beam_search, greedy_search
from capline.models.search import END, PAD, _banned_trigram_words, word_log_probs

V = 12


def make(decoder_cls, seed=0):
    torch.manual_seed(seed)
    decoder = decoder_cls(V, 8, embed_dim=16, hidden_dim=16).eval()
    features = torch.randn(5, 8, 2, 2) * 3
    return decoder, features


def reference_beam(decoder, features, k, max_len, length_penalty=0.0):
    """A straightforward per-image beam search, one image and one hypothesis at a time."""
    results = []
    for i in range(features.shape[0]):
        start = decoder.init_state(features[i : i + 1])
        beams = [([], 0.0, start, False)]
        for _ in range(max_len):
            candidates = []
            for words, score, state, done in beams:
                if done:
                    candidates.append((words + [PAD], score, state, True))
                    continue
                last = words[-1] if words else 1
                logits, new_state = decoder.step(torch.tensor([last]), state)
                logp = word_log_probs(logits)[0]  # <unk>, <start> and <pad> are never generated
                for w in range(V):
                    candidates.append((words + [w], score + logp[w].item(), new_state, w == END or w == PAD))
            candidates.sort(key=lambda c: -c[1])
            beams = candidates[:k]
            if all(b[3] for b in beams):
                break

        def norm(b):
            length = sum(1 for w in b[0] if w not in (PAD, END)) + (END in b[0])
            return b[1] / max(length, 1) ** length_penalty

        best = max(beams, key=norm)
        words = best[0][: best[0].index(END) + 1] if END in best[0] else best[0]
        results.append((words, norm(best)))
    return results


@pytest.mark.parametrize("decoder_cls", [ShowTellDecoder, AttentionDecoder])
def test_beam_of_one_is_greedy(decoder_cls):
    decoder, features = make(decoder_cls)
    greedy, beam = greedy_search(decoder, features, 10), beam_search(decoder, features, 1, 10)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores)


@pytest.mark.parametrize("decoder_cls", [ShowTellDecoder, AttentionDecoder, partial(AttentionDecoder, query="current")])
@pytest.mark.parametrize("k,penalty", [(3, 0.0), (4, 1.0)])
def test_batched_beam_equals_per_image_beam(decoder_cls, k, penalty):
    decoder, features = make(decoder_cls, seed=k)
    out = beam_search(decoder, features, k, 8, length_penalty=penalty)
    expected = reference_beam(decoder, features, k, 8, penalty)
    for row, (words, score) in zip(range(features.shape[0]), expected):
        got = [w for w in out.tokens[row].tolist() if w != PAD]
        assert got == [w for w in words if w != PAD]
        assert out.scores[row].item() == pytest.approx(score, abs=1e-4)


def test_beam_search_finds_at_least_the_greedy_score():
    decoder, features = make(ShowTellDecoder, seed=3)
    assert (beam_search(decoder, features, 5, 10).scores >= greedy_search(decoder, features, 10).scores - 1e-5).all()


def test_tokens_after_end_are_padding():
    decoder, features = make(ShowTellDecoder, seed=1)
    tokens = beam_search(decoder, features, 3, 12).tokens
    for row in tokens.tolist():
        if END in row:
            assert all(w == PAD for w in row[row.index(END) + 1 :])


def test_trigram_blocking():
    assert _banned_trigram_words(torch.tensor([[4, 5, 6, 4, 5]])) == [[6]]
    decoder, features = make(ShowTellDecoder, seed=2)
    tokens = beam_search(decoder, features, 3, 12, block_repeated_trigrams=True).tokens
    for row in tokens.tolist():
        words = [w for w in row if w not in (PAD, END)]
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        assert len(trigrams) == len(set(trigrams))


def test_attention_weights_are_returned_per_word():
    decoder, features = make(AttentionDecoder)
    out = beam_search(decoder, features, 3, 6)
    assert out.alphas.shape[:2] == out.tokens.shape and out.alphas.shape[2] == 4


@pytest.mark.parametrize("decoder_cls", [ShowTellDecoder, AttentionDecoder])
def test_search_in_blocks_of_images_equals_one_block(decoder_cls, monkeypatch):
    """Large searches run in blocks of images (and the attention energies in blocks that fit in cache): the
    result must not depend on the blocking."""
    import capline.models.decoders as decoders
    import capline.models.search as search

    torch.manual_seed(3)
    decoder = decoder_cls(V, 8, embed_dim=16, hidden_dim=16).eval()
    features = torch.randn(7, 8, 2, 2) * 3
    whole = beam_search(decoder, features, 3, 9)
    monkeypatch.setattr(search, "_SEARCH_BLOCK", 3 * V * 2)  # blocks of 2 images: 2, 2, 2, 1
    monkeypatch.setattr(decoders, "_ATTENTION_BLOCK", 3 * 4 * 16)  # one image's beams at a time
    blocked = beam_search(decoder, features, 3, 9)
    assert torch.equal(whole.tokens, blocked.tokens)
    torch.testing.assert_close(whole.scores, blocked.scores)
    if decoder_cls is AttentionDecoder:
        assert blocked.alphas.shape == (7, whole.tokens.shape[1], 4)
        torch.testing.assert_close(whole.alphas, blocked.alphas)
        with torch.enable_grad():  # training takes the unblocked path; the energies are the same numbers
            state = decoder.init_state(features)
            query = decoder.hidden_proj(state["h"])
            torch.testing.assert_close(decoder._energy(state["feats_proj"], query).detach(),
                                       torch.no_grad()(decoder._energy)(state["feats_proj"], query))  # fmt: skip


def test_blocked_attention_runs_under_bf16_autocast(monkeypatch):
    """Validation and test run the search under `bf16-mixed`; the blocked energies use out= tensors, which autocast
    does not cast, so they must pick the dtype themselves."""
    import capline.models.decoders as decoders

    torch.manual_seed(4)
    decoder = AttentionDecoder(V, 8, embed_dim=16, hidden_dim=16).eval()
    features = torch.randn(6, 8, 2, 2) * 3
    monkeypatch.setattr(decoders, "_ATTENTION_BLOCK", 3 * 4 * 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = beam_search(decoder, features, 3, 6)
        state = decoder.init_state(features)
        query = decoder.hidden_proj(state["h"])
        blocked = decoder._energy(state["feats_proj"], query)
    monkeypatch.setattr(decoders, "_ATTENTION_BLOCK", 1 << 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = decoder._energy(state["feats_proj"], query)
    assert out.tokens.shape[0] == 6 and torch.isfinite(out.scores).all()
    torch.testing.assert_close(blocked.float(), whole.float(), atol=0.05, rtol=0.05)
