import pytest
import torch

from capline.models import AttentionDecoder, CaptionDecoder, ShowTellDecoder, TimmEncoder
from capline.models.loss import masked_cross_entropy

V, B, T = 40, 3, 7


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet18", img_size=64).eval()
    with torch.no_grad():
        return encoder(torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8))


def tokens() -> torch.Tensor:
    t = torch.randint(4, V, (B, T))
    t[:, 0] = 1
    return t


def test_encoder_returns_feature_map_and_normalises_uint8():
    encoder = TimmEncoder("resnet18", img_size=64).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out_uint8, out_float = encoder(images), encoder(images.float())
    assert out_uint8.shape == (2, encoder.num_features, 2, 2)
    assert torch.equal(out_uint8, out_float)
    assert encoder.data_config["input_size"] == (3, 64, 64)


def current_query_decoder(vocab_size, feature_dim, **kwargs):
    return AttentionDecoder(vocab_size, feature_dim, query="current", **kwargs)


DECODERS = [ShowTellDecoder, AttentionDecoder, current_query_decoder]


@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_forward_shapes_and_fused_path_matches_steps(decoder_cls, features):
    torch.manual_seed(0)
    decoder = decoder_cls(V, features.shape[1], embed_dim=32, hidden_dim=48).eval()
    toks = tokens()
    logits = decoder(features, toks)
    assert logits.shape == (B, T, V)
    stepped = CaptionDecoder.forward(decoder, features, toks)
    torch.testing.assert_close(logits, stepped, atol=1e-5, rtol=1e-5)
    # ss_prob 0 is teacher forcing: the same logits
    torch.testing.assert_close(decoder.forward_scheduled(features, toks, 0.0), logits)


@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_ss_prob_one_feeds_the_models_own_predictions(decoder_cls, features):
    torch.manual_seed(0)
    decoder = decoder_cls(V, features.shape[1], embed_dim=32, hidden_dim=48).eval()
    toks = tokens()
    scheduled = decoder.forward_scheduled(features, toks, ss_prob=1.0, sample=False)
    # Replay: feed <start>, then the argmax of each step, by hand.
    state, inputs, expected = decoder.init_state(features), toks[:, 0], []
    for _ in range(T):
        logits, state = decoder.step(inputs, state)
        expected.append(logits)
        inputs = logits.argmax(-1)
    torch.testing.assert_close(scheduled, torch.stack(expected, 1))
    assert not torch.allclose(scheduled, decoder(features, toks))


def test_attention_weights_are_a_distribution_over_cells(features):
    decoder = AttentionDecoder(V, features.shape[1], embed_dim=16, hidden_dim=16, attention_dim=16).eval()
    state = decoder.init_state(features)
    _, state = decoder.step(torch.ones(B, dtype=torch.long), state)
    assert state["alpha"].shape == (B, 4)
    torch.testing.assert_close(state["alpha"].sum(1), torch.ones(B))


@pytest.mark.parametrize("query", ["previous", "current"])
def test_only_the_current_query_lets_the_word_just_read_choose_where_to_look(query, features):
    # Lu et al. 2017: with query="current", the attention for word t comes from h_t, which has read word t-1;
    # with Xu et al.'s "previous", it comes from h_{t-1}, before word t-1 is read.
    torch.manual_seed(0)
    decoder = AttentionDecoder(V, features.shape[1], embed_dim=16, hidden_dim=16, attention_dim=16, query=query)
    decoder.eval()
    state = decoder.init_state(features)
    _, first = decoder.step(torch.full((B,), 5), state)
    _, second = decoder.step(torch.full((B,), 6), state)
    assert torch.equal(first["alpha"], second["alpha"]) == (query == "previous")


def test_unknown_attention_query_fails_in_one_sentence():
    with pytest.raises(ValueError, match="query must be 'previous'.*or 'current'"):
        AttentionDecoder(V, 8, query="next")


def test_masked_loss_ignores_padding():
    logits = torch.randn(2, 4, V)
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    loss = masked_cross_entropy(logits, targets)
    by_hand = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0])
    torch.testing.assert_close(loss, by_hand)
    changed = logits.clone()
    changed[0, 3] += 100.0  # a padded position: must not change the loss
    torch.testing.assert_close(masked_cross_entropy(changed, targets), loss)
