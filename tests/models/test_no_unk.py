"""No generated caption says `<unk>`, even from a decoder trained to prefer it. (`capline predict`, `capline test`
and validation generate through `greedy_search` and `beam_search`; SCST samples through `sample_captions`.)"""

from __future__ import annotations

import pytest
import torch

from capline.models import AttentionDecoder, ShowTellDecoder, beam_search, greedy_search
from capline.models.loss import masked_cross_entropy
from capline.models.scst import sample_captions
from capline.models.search import END, START, UNK

V, C = 12, 8
CAPTION = [START, 5, UNK, UNK, 6, UNK, END]  # "a <unk> <unk> man <unk>": half of every training caption


def trained_to_say_unk(cls) -> torch.nn.Module:
    torch.manual_seed(0)
    decoder = cls(V, C, embed_dim=16, hidden_dim=32, dropout=0.0)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.02)
    features = torch.randn(8, C, 2, 2)
    tokens = torch.tensor([CAPTION] * 8)
    for _ in range(60):
        loss = masked_cross_entropy(decoder(features, tokens[:, :-1]), tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return decoder.eval()


@pytest.mark.parametrize("cls", [ShowTellDecoder, AttentionDecoder])
def test_greedy_beam_and_scst_samples_never_emit_unk(cls):
    decoder = trained_to_say_unk(cls)
    features = torch.randn(6, C, 2, 2)
    with torch.no_grad():  # the decoder did learn it: unconstrained, <unk> is its most likely second word
        logits, state = decoder.step(torch.full((6,), START), decoder.init_state(features))
        logits, _ = decoder.step(logits.argmax(-1), state)
    assert (logits.argmax(-1) == UNK).all()
    outputs = [greedy_search(decoder, features, 10).tokens, beam_search(decoder, features, 3, 10).tokens]
    torch.manual_seed(0)
    outputs.append(sample_captions(decoder, features, 5, 10).tokens)
    for tokens in outputs:
        assert not (tokens == UNK).any()
        assert (tokens[:, 0] == 5).all()  # the rest of what it learnt stands: the first word
