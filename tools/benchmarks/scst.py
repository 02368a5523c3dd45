"""SCST: training step time against a cross-entropy step on the same batch and model, and the reward's share.

    python -m tools.benchmarks.scst            # 20 timed steps of each, per decoder
    python -m tools.benchmarks.scst --quick    # 8

A cross-entropy step is what `CaptionModule.training_step` and the optimizer do without SCST: encode (the demo's
resnet18 at 64 px, trained), teacher-forced decoder, masked cross-entropy, backward, AdamW; batch 64, 14-token
captions. An SCST step on the same batch: encode, the greedy baseline (no autograd, eval mode), k = 5 sampled
captions per image (16 words at most, with autograd), the CIDEr-D reward of all 6 x 64 captions against the
image's 5 references with the document frequencies of a 2,000-image corpus, the policy-gradient loss, backward,
AdamW. The model is untrained, so samples rarely end early: the sampling runs its full length. The two kinds
alternate step by step on one model, so load on a shared machine hits both alike; the value is the ratio of
the best step times (the least disturbed by other jobs), and the reward share is the reward's time within
those SCST steps (median).
"""

from __future__ import annotations

import statistics
import time

import torch

from capline.data.collate import reference_ids
from capline.data.synthetic import generate_scene
from capline.metrics.reward import CiderReward
from capline.models.loss import masked_cross_entropy
from capline.models.scst import SCST, scst_loss
from tools.benchmarks import main
from tools.benchmarks import row as _row
from tools.benchmarks.overhead import DEMO_MAX_LEN, demo_module, demo_vocabulary, make_batches
from tools.benchmarks.sampling import DECODERS

GOAL = 2.5
NUM_SAMPLES = 5
NUM_REFS = 5
CORPUS_IMAGES = 2000
WARMUP_STEPS = 2


def corpus_reward(vocab) -> tuple[CiderReward, list[list[list[int]]]]:
    """The reward over the references of the first `CORPUS_IMAGES` synthetic scenes (drawn small: only words count)."""
    scenes = range(CORPUS_IMAGES)
    refs = [[reference_ids(c, vocab, DEMO_MAX_LEN) for c in generate_scene(i, image_size=32)[1]] for i in scenes]
    return CiderReward.from_references(refs), refs


def batch_refs(corpus: list[list[list[int]]], batch_size: int) -> torch.Tensor:
    """(B, R, L) references of the first `batch_size` corpus images, as training batches carry them."""
    out = torch.zeros(batch_size, NUM_REFS, DEMO_MAX_LEN, dtype=torch.long)
    for i in range(batch_size):
        for j, ref in enumerate(corpus[i % len(corpus)][:NUM_REFS]):
            out[i, j, : len(ref)] = torch.tensor(ref)
    return out


class TimedReward:
    """The reward, with the seconds spent in it since the last `take()`."""

    def __init__(self, reward: CiderReward):
        self.reward, self.seconds = reward, 0.0

    def __call__(self, captions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        scores = self.reward(captions, references)
        self.seconds += time.perf_counter() - start
        return scores

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def step_times(decoder: str, steps: int) -> dict[str, list[float]]:
    """Seconds per cross-entropy and per SCST step, and the reward's seconds in each SCST step."""
    vocab = demo_vocabulary()
    module = demo_module(vocab, **DECODERS[decoder])
    module.train()
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    batch = make_batches(len(vocab), num=1)[0]
    reward, corpus = corpus_reward(vocab)
    timed = TimedReward(reward)
    refs, config = batch_refs(corpus, batch["tokens"].shape[0]), SCST(num_samples=NUM_SAMPLES)
    times: dict[str, list[float]] = {"xe": [], "scst": [], "reward": []}
    for step in range(WARMUP_STEPS + steps):
        for kind in ("xe", "scst") if step % 2 else ("scst", "xe"):  # neither always goes first
            start = time.perf_counter()
            features = module.encoder(batch["images"])
            if kind == "xe":
                tokens = batch["tokens"]  # (B, T)
                loss = masked_cross_entropy(module.decoder(features, tokens[:, :-1]), tokens[:, 1:])
            else:
                loss, _ = scst_loss(module.decoder, features, refs, timed, config, DEMO_MAX_LEN)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds, reward_seconds = time.perf_counter() - start, timed.take()
            if step >= WARMUP_STEPS:
                times[kind].append(seconds)
                if kind == "scst":
                    times["reward"].append(reward_seconds / seconds)
    return times


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """Per decoder: best SCST step time / best cross-entropy step time (goal <= 2.5), the reward's share."""
    steps = steps or (8 if quick else 20)
    rows = []
    for decoder in DECODERS:
        times = step_times(decoder, steps)
        xe_s, scst_s = min(times["xe"]), min(times["scst"])
        ratio = scst_s / xe_s
        rows.append(_row(f"scst_step_vs_xe_step_{decoder}", ratio, GOAL, ratio <= GOAL))
        rows.append(_row(f"scst_step_ms_{decoder}", scst_s * 1000))
        rows.append(_row(f"xe_step_ms_{decoder}", xe_s * 1000))
        rows.append(_row(f"scst_reward_share_{decoder}", statistics.median(times["reward"])))
    return rows


if __name__ == "__main__":
    main(__doc__, run, "8 timed steps of each kind per decoder")
