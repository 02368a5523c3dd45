"""Self-critical sequence training (Rennie et al. 2017): sample captions, score them, reinforce by advantage.

The reward is any callable that scores (N, L) caption ids against (N, R, L') reference ids; capline's is
`capline.metrics.reward.CiderReward` (CIDEr-D with training-corpus document frequencies). The baseline is the
greedy caption's reward (the paper) or, with several samples per image, the mean reward of the image's other
samples ("new self-critical", Luo 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from capline.models.decoders import CaptionDecoder
from capline.models.search import END, PAD, START, greedy_search, word_log_probs

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, L) ids, (N, R, L') refs -> (N,) rewards


@dataclass
class SCST:
    """The SCST phase of training; it starts at `start_step` of the same run and lasts to the end."""

    start_step: int = 0  # global step of the switch from cross-entropy (start once cross-entropy has converged)
    num_samples: int = 5  # captions sampled per image (multinomial)
    temperature: float = 1.0  # softmax temperature of the sampling
    baseline: Literal["greedy", "mean"] = "greedy"  # greedy caption's reward, or mean of the other samples'
    lr: float = 5e-5  # decoder learning rate from the switch on, constant; the encoder's is scaled alike
    max_len: int | None = None  # most words per sampled caption (None: the model's max_len)
    train_encoder: bool = True  # keep fine-tuning the CNN during SCST (false: frozen, BatchNorm in eval)

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"model.scst.num_samples must be at least 1, got {self.num_samples}")
        if self.baseline not in ("greedy", "mean"):
            raise ValueError(f"model.scst.baseline must be 'greedy' or 'mean', got {self.baseline!r}")
        if self.baseline == "mean" and self.num_samples < 2:
            raise ValueError("model.scst.baseline 'mean' needs num_samples >= 2: a sample's baseline is the others'")
        if not self.temperature > 0 or not self.lr > 0:
            raise ValueError(f"model.scst.temperature and lr must be positive, got {self.temperature} and {self.lr}")

    def active(self, step: int) -> bool:
        return step >= self.start_step


@dataclass
class Samples:
    """Sampled captions, k per image, image-major: `tokens` (B*k, L) ending with `<end>` (or a sampled `<pad>`)
    then `<pad>`; `logprobs` (B*k, L) of each sampled word (0 after the end); `mask` (B*k, L) True where sampled."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor


def sample_captions(
    decoder: CaptionDecoder, features: torch.Tensor, num_samples: int, max_len: int, temperature: float = 1.0
) -> Samples:
    """Draws `num_samples` captions per image from the decoder's distribution, keeping the graph of their
    log-probabilities. State the decoder holds once per image (attention features) is not repeated."""
    batch, device = features.shape[0], features.device
    state = decoder.init_state(features)
    rows = torch.arange(batch, device=device).repeat_interleave(num_samples)
    per_sample = {key: value for key, value in state.items() if key not in decoder.image_state}
    state |= decoder.reorder_state(per_sample, rows)
    tokens = torch.full((batch * num_samples,), START, dtype=torch.long, device=device)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    seqs, logprobs, masks = [], [], []
    for _ in range(max_len):
        logits, state = decoder.step(tokens, state)
        logp = word_log_probs(logits, temperature)  # (B*k, V); <unk> is never sampled
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        live = ~done
        tokens = tokens.masked_fill(done, PAD)
        seqs.append(tokens)
        # 0 after a caption's end (where, not a product: the <pad> fed there has log-probability -inf)
        logprobs.append(torch.where(live, logp.gather(1, tokens.unsqueeze(1)).squeeze(1), 0.0))
        masks.append(live)
        done = done | (tokens == END) | (tokens == PAD)  # a sampled <pad> ends the caption as the reward reads it
        if done.all():
            break
    return Samples(torch.stack(seqs, 1), torch.stack(logprobs, 1), torch.stack(masks, 1))


def leave_one_out_baseline(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the other samples of its image. rewards (B*k,) image-major."""
    per_image = rewards.view(-1, num_samples)  # (B, k)
    return ((per_image.sum(1, keepdim=True) - per_image) / (num_samples - 1)).view(-1)


def policy_gradient_loss(samples: Samples, advantages: torch.Tensor) -> torch.Tensor:
    """-(r - b) times each sample's summed word log-probabilities (padding masked), averaged over samples."""
    return -(advantages.detach() * samples.logprobs.sum(dim=1)).mean()


def caption_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Words per caption, `<end>` excluded. tokens (N, L)."""
    return ((tokens != PAD) & (tokens != END)).sum(dim=1)


def scst_loss(
    decoder: CaptionDecoder, features: torch.Tensor, refs: torch.Tensor, reward: RewardFn, config: SCST, max_len: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SCST loss of one batch and what to log about it.

    Args:
        decoder: The caption decoder, in training mode (dropout on while sampling, as self-critical.pytorch).
        features: Encoder features (B, C, h, w).
        refs: (B, R, L') reference ids of each image, 0-padded.
        reward: Scores (N, L) captions against (N, R, L') references.
        config: The SCST settings.
        max_len: Most words per caption when `config.max_len` is None.

    Returns:
        The loss and the scalars `reward` (mean sample reward), `baseline`, `advantage_std`, `greedy_reward`,
        `sample_length` and `greedy_length`.
    """
    k, max_len = config.num_samples, config.max_len or max_len
    was_training = decoder.training
    decoder.eval()  # the greedy caption of the model itself: no dropout, no autograd (its graph is not needed)
    greedy = greedy_search(decoder, features.detach(), max_len).tokens
    decoder.train(was_training)
    samples = sample_captions(decoder, features, k, max_len, config.temperature)
    # One call scores the samples and the greedy captions: (B*k + B) rows.
    scores = reward(torch.cat([_pad_to(samples.tokens, max_len), _pad_to(greedy, max_len)]),
                    torch.cat([refs.repeat_interleave(k, dim=0), refs]))  # fmt: skip
    sample_reward, greedy_reward = scores[: samples.tokens.shape[0]], scores[samples.tokens.shape[0] :]
    if config.baseline == "greedy":
        baseline = greedy_reward.repeat_interleave(k)
    else:
        baseline = leave_one_out_baseline(sample_reward, k)
    advantages = (sample_reward - baseline).to(features.device)
    loss = policy_gradient_loss(samples, advantages)
    logs = {
        "reward": sample_reward.mean(),
        "baseline": baseline.mean(),
        "advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
        "greedy_reward": greedy_reward.mean(),
        "sample_length": caption_lengths(samples.tokens).float().mean(),
        "greedy_length": caption_lengths(greedy).float().mean(),
    }
    return loss, {key: value.detach().float().cpu() for key, value in logs.items()}


def _pad_to(tokens: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(tokens, (0, length - tokens.shape[1]), value=PAD)
