"""Caption generation for any `CaptionDecoder`: greedy decoding and batched beam search."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capline.models.decoders import CaptionDecoder
from capline.vocab import Vocabulary

START, END, PAD, UNK = Vocabulary.start_id, Vocabulary.end_id, Vocabulary.pad_id, Vocabulary.unk_id
# Words a generated caption never contains: <unk> (a caption that says "a man sitting on a <unk>" tells the reader
# nothing; self-critical.pytorch and most captioners forbid it too), <start>, and <pad> (a caption ends with <end>).
NEVER_GENERATED = (PAD, START, UNK)
_SEARCH_BLOCK = 1 << 22  # beams x vocabulary scores per block of a beam search (16 MiB of float32)


@dataclass
class Generation:
    """Generated captions: `tokens` (B, L) word ids ending with `<end>` then `<pad>` (no `<start>`),
    `scores` (B,) their log-probabilities (length-normalised for beam search), and for attention decoders
    `alphas` (B, L, N), the attention weights over the N feature-map cells used for each word."""

    tokens: torch.Tensor
    scores: torch.Tensor
    alphas: torch.Tensor | None = None


def _finish(seqs: list[torch.Tensor], alphas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens = torch.stack(seqs, dim=1)
    # Everything after the first <end> becomes padding.
    ended = (tokens == END).long().cumsum(dim=1)
    tokens = tokens.masked_fill((ended - (tokens == END).long()) > 0, PAD)
    if not alphas:
        return tokens, None
    return tokens, torch.stack(alphas, dim=1).masked_fill((tokens == PAD).unsqueeze(2), 0.0)  # no word, no weights


def word_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (..., V) of the next word for generation, in float32: the words a caption never contains
    (`NEVER_GENERATED`) get probability 0, the others share all of it."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    never = torch.tensor(NEVER_GENERATED, device=logits.device)
    return F.log_softmax(logits.index_fill(-1, never, float("-inf")), dim=-1)  # out of place: SCST backpropagates


@torch.no_grad()
def greedy_search(decoder: CaptionDecoder, features: torch.Tensor, max_len: int = 20) -> Generation:
    """Picks the most probable word at each step; stops when every caption has ended."""
    state = decoder.init_state(features)
    batch = features.shape[0]
    tokens = torch.full((batch,), START, dtype=torch.long, device=features.device)
    done = torch.zeros(batch, dtype=torch.bool, device=features.device)
    scores = torch.zeros(batch, device=features.device)
    seqs, alphas = [], []
    for _ in range(max_len):
        logits, state = decoder.step(tokens, state)
        logp = word_log_probs(logits)
        best, tokens = logp.max(dim=-1)
        tokens = tokens.masked_fill(done, PAD)
        scores += best.masked_fill(done, 0.0)
        seqs.append(tokens)
        if "alpha" in state:
            alphas.append(state["alpha"])
        done |= tokens == END
        if done.all():
            break
    tokens, alpha = _finish(seqs, alphas)
    return Generation(tokens, scores, alpha)


def _banned_trigram_words(seqs: torch.Tensor) -> list[list[int]]:
    """For each row of seqs (N, t), the words that would repeat a trigram already in the row."""
    banned = []
    for row in seqs.tolist():
        if len(row) < 3:
            banned.append([])
            continue
        last = tuple(row[-2:])
        banned.append([row[i + 2] for i in range(len(row) - 2) if tuple(row[i : i + 2]) == last])
    return banned


@torch.no_grad()
def beam_search(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 0.0,
    block_repeated_trigrams: bool = False,
) -> Generation:
    """Batched beam search: all images' beams advance together in one (B*K)-row decoder step.

    Hypotheses are ranked by summed log-probability while searching; the final choice among the K beams uses
    the score divided by `length ** length_penalty` (0 = no normalisation), length counting the `<end>` token.
    A beam that emitted `<end>` is kept as is (it extends only with `<pad>` at no cost).

    Args:
        decoder: Any `CaptionDecoder`.
        features: Encoder features (B, C, h, w).
        beam_size: Beams per image; 1 equals greedy decoding.
        max_len: Most words generated per caption, `<end>` included.
        length_penalty: Exponent of the length normalisation of final scores.
        block_repeated_trigrams: Forbid a word that would repeat a trigram already in the hypothesis.

    Returns:
        The best hypothesis per image.
    """
    block = max(1, _SEARCH_BLOCK // (beam_size * decoder.vocab_size))
    if features.shape[0] <= block:
        return _beam_search_block(decoder, features, beam_size, max_len, length_penalty, block_repeated_trigrams)
    # Blocks of images whose (beams x vocabulary) score matrices stay small: tensors of tens of MB are
    # fresh memory at every word (page faults) and pass through RAM instead of cache; images are independent.
    parts = [
        _beam_search_block(decoder, chunk, beam_size, max_len, length_penalty, block_repeated_trigrams)
        for chunk in features.split(block)
    ]
    return _concat(parts)


def _concat(parts: list[Generation]) -> Generation:
    length = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, length - p.tokens.shape[1]), value=PAD) for p in parts])
    alphas = None
    if parts[0].alphas is not None:
        alphas = torch.cat([F.pad(p.alphas, (0, 0, 0, length - p.alphas.shape[1])) for p in parts])
    return Generation(tokens, torch.cat([p.scores for p in parts]), alphas)


def _beam_search_block(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    beam_size: int,
    max_len: int,
    length_penalty: float,
    block_repeated_trigrams: bool,
) -> Generation:
    batch, k = features.shape[0], beam_size
    device = features.device
    state = decoder.init_state(features)
    per_beam = {key: value for key, value in state.items() if key not in decoder.image_state}
    state |= decoder.reorder_state(per_beam, torch.arange(batch, device=device).repeat_interleave(k))
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # only the first beam is live at the start, so the K beams do not all repeat it
    tokens = torch.full((batch * k,), START, dtype=torch.long, device=device)
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    seqs = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    alphas: torch.Tensor | None = None
    # Entries that step never changes (the attention decoder's image features, held once per image) are equal
    # for all beams of an image, and beams never move between images: only the others need reordering.
    unchanged = set(state)
    for _ in range(max_len):
        logits, stepped = decoder.step(tokens, state)
        unchanged = {key for key in unchanged if stepped.get(key) is state[key]}
        state = stepped
        logp = word_log_probs(logits)  # (B*K, V)
        if block_repeated_trigrams and seqs.shape[1] >= 2:
            for row, words in enumerate(_banned_trigram_words(seqs)):
                logp[row, words] = float("-inf")
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0
        vocab = logp.shape[1]
        total = logp.add_(scores.view(-1, 1)).view(batch, k * vocab)
        scores, flat = total.topk(k, dim=1)  # (B, K)
        origin = (torch.arange(batch, device=device).unsqueeze(1) * k + flat // vocab).view(-1)
        tokens = (flat % vocab).view(-1)
        changed = {key: value for key, value in state.items() if key not in unchanged}
        state = {**state, **decoder.reorder_state(changed, origin)}
        seqs = torch.cat([seqs[origin], tokens.unsqueeze(1)], dim=1)
        if "alpha" in state:
            step_alpha = state["alpha"].unsqueeze(1)
            alphas = step_alpha if alphas is None else torch.cat([alphas[origin], step_alpha], dim=1)
        done = done[origin] | (tokens == END) | (tokens == PAD)
        if done.all():
            break
    lengths = ((seqs != PAD) & (seqs != END)).sum(dim=1) + (seqs == END).any(dim=1).long()  # (B*K,)
    final = scores.view(-1) / lengths.clamp(min=1).float() ** length_penalty
    best = final.view(batch, k).argmax(dim=1) + torch.arange(batch, device=device) * k
    out_tokens, out_alpha = _finish(list(seqs[best].unbind(1)), [] if alphas is None else list(alphas[best].unbind(1)))
    return Generation(out_tokens, final[best], out_alpha)
