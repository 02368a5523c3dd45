"""SCST's sampling, baselines and policy-gradient loss on tiny decoders."""

from __future__ import annotations

import pytest
import torch

from capline.models import AttentionDecoder, ShowTellDecoder
from capline.models.scst import (
    SCST,
    Samples,
    leave_one_out_baseline,
    policy_gradient_loss,
    sample_captions,
    scst_loss,
)
from capline.models.search import END, PAD, START, word_log_probs

V, B, C, K, L = 30, 3, 16, 4, 8


def features(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, 2, 2, generator=torch.Generator().manual_seed(seed))


def decoder(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(V, C, embed_dim=16, hidden_dim=24, **({"attention_dim": 8} if cls is AttentionDecoder else {}))


def teacher_forced_logprobs(dec, feats: torch.Tensor, samples, k: int) -> torch.Tensor:
    """Per-word log-probabilities of sampled captions (N, L) by teacher forcing, 0 after each caption's end."""
    tokens = samples.tokens
    inputs = torch.cat([torch.full((tokens.shape[0], 1), START), tokens[:, :-1]], dim=1)
    logp = word_log_probs(dec(feats.repeat_interleave(k, dim=0), inputs))  # the distribution sampled from
    return torch.where(samples.mask, logp.gather(2, tokens.unsqueeze(2)).squeeze(2), 0.0)


def test_mean_baseline_leaves_each_sample_out_of_its_own_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert torch.allclose(leave_one_out_baseline(rewards, 3), torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))
    changed = rewards.clone()
    changed[1] = 100.0  # a sample's own reward never moves its own baseline, only its image-mates'
    before, after = leave_one_out_baseline(rewards, 3), leave_one_out_baseline(changed, 3)
    assert after[1] == before[1] and torch.equal(after[3:], before[3:]) and (after[[0, 2]] > before[[0, 2]]).all()


@pytest.mark.parametrize("cls", [ShowTellDecoder, AttentionDecoder])
def test_samples_end_with_end_then_padding_and_carry_their_log_probabilities(cls):
    dec = decoder(cls).eval()  # no dropout, so teacher forcing reproduces the sampling distribution
    feats = features()
    torch.manual_seed(1)
    samples = sample_captions(dec, feats, K, L)
    assert samples.tokens.shape[0] == B * K and samples.tokens.shape[1] <= L
    for row, mask in zip(samples.tokens.tolist(), samples.mask.tolist()):
        ends = [i for i, t in enumerate(row) if t == END]
        assert PAD not in row[: ends[0] if ends else len(row)]  # <pad> is never sampled
        end = ends[0] if ends else len(row) - 1
        assert all(t == PAD for t in row[end + 1 :]) and mask == [i <= end for i in range(len(row))]
    expected = teacher_forced_logprobs(dec, feats, samples, K)
    assert torch.allclose(samples.logprobs, expected, atol=1e-5)
    assert samples.logprobs.requires_grad and (samples.logprobs[~samples.mask] == 0).all()


@pytest.mark.parametrize("cls", [ShowTellDecoder, AttentionDecoder])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_raises_the_log_probability_of_a_positive_advantage_sample_and_lowers_a_negative_one(cls, sign):
    dec = decoder(cls).eval()
    feats = features()
    torch.manual_seed(2)
    samples = sample_captions(dec, feats, 1, L)
    before = teacher_forced_logprobs(dec, feats, samples, 1).sum(1).detach()
    optimizer = torch.optim.SGD(dec.parameters(), lr=0.05)
    policy_gradient_loss(samples, torch.full((B,), sign)).backward()
    optimizer.step()
    after = teacher_forced_logprobs(dec, feats, samples, 1).sum(1).detach()
    assert (torch.sign(after - before) == sign).all(), (before, after)


def test_scst_loss_baselines_and_logs():
    dec = decoder(AttentionDecoder).train()
    feats, refs = features(), torch.randint(4, V, (B, 2, 5))

    def length_reward(captions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        assert captions.shape[0] == references.shape[0] == B * K + B  # samples and greedy captions, one call
        return (captions != PAD).sum(1).float()

    for baseline in ("greedy", "mean"):
        torch.manual_seed(3)
        loss, logs = scst_loss(dec, feats, refs, length_reward, SCST(num_samples=K, baseline=baseline), L)
        assert dec.training  # the greedy baseline ran in eval mode; training mode is back
        assert loss.requires_grad and torch.isfinite(loss)
        assert set(logs) == {"reward", "baseline", "advantage_std", "greedy_reward", "sample_length", "greedy_length"}
        if baseline == "mean":  # the mean of leave-one-out means is the mean reward
            assert logs["baseline"] == pytest.approx(float(logs["reward"]), rel=1e-6)
        else:
            assert logs["baseline"] == pytest.approx(float(logs["greedy_reward"]), rel=1e-6)
        loss.backward()
        assert all(p.grad is not None for p in dec.parameters())
        dec.zero_grad()


def test_a_constant_reward_has_zero_advantage_and_zero_gradient():
    dec = decoder(ShowTellDecoder).train()
    samples = sample_captions(dec, features(), K, L)
    loss = policy_gradient_loss(samples, torch.zeros(B * K))
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in dec.parameters() if p.grad is not None)
    assert isinstance(samples, Samples)


def test_invalid_settings_fail_in_one_sentence():
    with pytest.raises(ValueError, match="needs num_samples >= 2"):
        SCST(num_samples=1, baseline="mean")
    with pytest.raises(ValueError, match="'greedy' or 'mean'"):
        SCST(baseline="max")
    assert not SCST(start_step=10).active(9) and SCST(start_step=10).active(10)
