"""Step-indexed schedules: learning rate, encoder warm-up/fine-tuning phase, scheduled sampling.

Each is a pure function of the global step (and epoch), so a resumed run is in the right phase by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class LRSchedule:
    """Multiplier of every learning rate over training."""

    name: Literal["constant", "cosine", "step"] = "cosine"  # step: exponential step decay as in im2txt
    warmup_steps: int = 0  # linear warm-up from 0 to the full rate
    min_ratio: float = 0.0  # cosine: floor, as a fraction of the full rate
    decay_rate: float = 0.5  # step: multiply by this...
    decay_steps: int = 10_000  # step: ...every this many steps

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.decay_rate ** (step // self.decay_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EncoderFinetuning:
    """The CNN stays frozen while the LSTM warms up, then is fine-tuned with its own learning rate."""

    freeze_steps: int = 0  # steps with the encoder frozen (no gradient, BatchNorm in eval); -1: never train it
    lr: float = 1e-5  # encoder learning rate once unfrozen (per global batch)
    warmup_steps: int = 0  # linear ramp of the encoder rate after unfreezing, so pretrained features survive

    def trainable(self, step: int) -> bool:
        return self.freeze_steps >= 0 and step >= self.freeze_steps

    def factor(self, step: int) -> float:
        """Multiplier of the encoder learning rate at `step` (0 while frozen)."""
        if not self.trainable(step):
            return 0.0
        return min(1.0, (step - self.freeze_steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0


@dataclass
class ScheduledSampling:
    """Probability of feeding the decoder its own previous word instead of the ground truth (Bengio et al. 2015).

    The paper's schedules decay the probability eps of using the truth; here ss_prob = 1 - eps, capped at
    `max_prob`, counted from `start_step`. `step` is the stepped schedule of self-critical.pytorch:
    +`increase_by` every `increase_every` epochs from `start_epoch`.
    """

    schedule: Literal["none", "linear", "exponential", "inverse_sigmoid", "step"] = "none"
    max_prob: float = 0.25  # the cap on ss_prob
    start_step: int = 0  # linear/exponential/inverse_sigmoid: steps of pure teacher forcing first
    slope: float = 1e-4  # linear: ss_prob = slope * steps since start
    k: float = 0.9999  # exponential: ss_prob = 1 - k^t (k < 1); inverse_sigmoid: 1 - k / (k + exp(t / k)) (k >= 1)
    start_epoch: int = 0  # step: first epoch of the schedule
    increase_every: int = 5  # step: epochs between increases
    increase_by: float = 0.05  # step: increase per period
    sample: bool = True  # feed a word sampled from the model's distribution (else its argmax)

    def prob(self, step: int, epoch: int = 0) -> float:
        if self.schedule == "none":
            return 0.0
        if self.schedule == "step":
            if epoch < self.start_epoch:
                return 0.0
            return min(self.max_prob, self.increase_by * ((epoch - self.start_epoch) // self.increase_every))
        t = step - self.start_step
        if t < 0:
            return 0.0
        if self.schedule == "linear":
            p = self.slope * t
        elif self.schedule == "exponential":
            p = 1.0 - self.k**t
        else:
            p = 1.0 - self.k / (self.k + math.exp(min(t / self.k, 700.0)))
        return min(self.max_prob, max(0.0, p))
