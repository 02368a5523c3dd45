"""Scheduled sampling: training step time with ss_prob 0.25 against teacher forcing (ss_prob 0), same model.

    python -m tools.benchmarks.sampling            # 30 timed steps of each, per decoder
    python -m tools.benchmarks.sampling --quick    # 12

A step is what `CaptionModule.training_step` and the optimizer do: encode (the demo's resnet18 at 64 px, trained),
`decoder.forward_scheduled`, masked cross-entropy, backward, AdamW; batch 64, 14-token
captions. For ShowTellDecoder, ss_prob 0 takes the fused `nn.LSTM` call over the whole sequence and 0.25 steps
word by word, sampling each fed-back word. AttentionDecoder steps word by word either way, so its ratio is the
cost of the sampling alone. The two settings alternate step by step on one model, so load on a shared machine
hits both alike; the value is the ratio of the best step times (the least disturbed by other jobs).
"""

from __future__ import annotations

import time

from capline.models import AttentionDecoder
from capline.models.loss import masked_cross_entropy
from tools.benchmarks import main
from tools.benchmarks import row as _row
from tools.benchmarks.overhead import demo_module, demo_vocabulary, make_batches

SS_PROB = 0.25  # self-critical.pytorch's cap
GOAL = 1.5
WARMUP_STEPS = 3
# `demo_module` arguments: the demo's own decoder, and an attention decoder as wide as it (256, dropout 0.1).
DECODERS = {
    "show_tell": {},
    "attention": {
        "decoder": AttentionDecoder, "embed_dim": 256, "hidden_dim": 256, "attention_dim": 256, "dropout": 0.1,
    },
}  # fmt: skip


def step_times(decoder: str, steps: int) -> dict[float, list[float]]:
    """Seconds per training step for ss_prob 0 and `SS_PROB`, alternating, warm-up steps excluded."""
    vocab = demo_vocabulary()
    module = demo_module(vocab, **DECODERS[decoder])
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params)
    batches = make_batches(len(vocab), num=2)
    times: dict[float, list[float]] = {0.0: [], SS_PROB: []}
    for step in range(WARMUP_STEPS + steps):
        for ss_prob in (0.0, SS_PROB) if step % 2 else (SS_PROB, 0.0):  # neither always goes first
            tokens = batches[step % 2]["tokens"]  # (B, T)
            start = time.perf_counter()
            features = module.encoder(batches[step % 2]["images"])
            logits = module.decoder.forward_scheduled(features, tokens[:, :-1], ss_prob, sample=True)
            loss = masked_cross_entropy(logits, tokens[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= WARMUP_STEPS:
                times[ss_prob].append(time.perf_counter() - start)
    return times


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """Per decoder: median step time with scheduled sampling / without; goal < 1.5."""
    steps = steps or (12 if quick else 30)
    rows = []
    for decoder in DECODERS:
        times = step_times(decoder, steps)
        tf_s, ss_s = min(times[0.0]), min(times[SS_PROB])
        ratio = ss_s / tf_s
        rows.append(_row(f"sched_sampling_step_ratio_{decoder}", ratio, GOAL, ratio < GOAL))
        rows.append(_row(f"sched_sampling_step_ms_{decoder}", ss_s * 1000))
        rows.append(_row(f"teacher_forcing_step_ms_{decoder}", tf_s * 1000))
    return rows


if __name__ == "__main__":
    main(__doc__, run, "12 timed steps of each setting per decoder")
