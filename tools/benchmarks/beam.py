"""Beam search: batched `beam_search` against the same search run one image at a time, same process and inputs.

    python -m tools.benchmarks.beam            # 500 images, beam 3, max_len 20; best of 3 batched timings
    python -m tools.benchmarks.beam --quick    # one timing of each; the per-image loop on 100 images, scaled
    OMP_NUM_THREADS=1 python -m tools.benchmarks.beam --quick   # on a CPU shared with other jobs (steadier)

Both decoders are timed at a realistic size (vocabulary 10,000, ResNet-50's 2048-channel 7x7 feature map, 512-wide
LSTM and attention), randomly initialised, in eval mode under `torch.no_grad`, on the GPU when there is one. One
image at a time through the same `beam_search` (batch 1) is the fair per-image baseline: the search logic is
identical, only the batching differs. The per-image loop takes minutes on a CPU (about 0.2 s per image).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from capline.models import AttentionDecoder, ShowTellDecoder, beam_search
from tools.benchmarks import main
from tools.benchmarks import row as _row

VOCAB_SIZE = 10_000
FEATURE_DIM, GRID = 2048, 7  # ResNet-50's last feature map
NUM_IMAGES, BEAM_SIZE, MAX_LEN = 500, 3, 20
QUICK_PER_IMAGE = 100  # --quick: the per-image baseline on 100 of the 500 images, its time scaled by 5

DECODERS = {
    "show_tell": lambda: ShowTellDecoder(VOCAB_SIZE, FEATURE_DIM, embed_dim=512, hidden_dim=512),
    "attention": lambda: AttentionDecoder(VOCAB_SIZE, FEATURE_DIM, embed_dim=512, hidden_dim=512, attention_dim=512),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(name: str, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A randomly initialised decoder and post-ReLU features (NUM_IMAGES, FEATURE_DIM, GRID, GRID)."""
    torch.manual_seed(seed)
    decoder = DECODERS[name]().eval().to(device)
    features = torch.randn(NUM_IMAGES, FEATURE_DIM, GRID, GRID).relu().to(device)
    return decoder, features


def _timed(fn) -> tuple[float, torch.Tensor]:
    _synchronize()
    start = time.perf_counter()
    tokens = fn()
    _synchronize()
    return time.perf_counter() - start, tokens


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def compare(decoder: torch.nn.Module, features: torch.Tensor, repeats: int, per_image_count: int | None = None) -> dict:
    """Times both searches on the same inputs; returns seconds for each and the fraction of identical captions.

    With `per_image_count`, the per-image loop runs on the first that many images only and its time is scaled to
    all of them (one call per image: its cost is linear in the count); the captions are compared on those images.
    """

    def batched() -> torch.Tensor:
        return beam_search(decoder, features, BEAM_SIZE, MAX_LEN).tokens

    def per_image() -> list[torch.Tensor]:
        return [beam_search(decoder, image, BEAM_SIZE, MAX_LEN).tokens[0] for image in features[:count].split(1)]

    count = per_image_count or len(features)

    # Best of `repeats` for the batched search (its first call pays one-off allocations); the per-image loop
    # makes one call per image, so a single pass already averages that away.
    batched_s, batched_tokens = min((_timed(batched) for _ in range(repeats)), key=lambda t: t[0])
    per_image_s, per_image_tokens = _timed(per_image)
    identical = sum(_same(batched_tokens[i], row) for i, row in enumerate(per_image_tokens))
    per_image_s *= len(features) / count
    return {"batched_s": batched_s, "per_image_s": per_image_s, "identical": identical / len(per_image_tokens)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # A batch is padded (with <pad> = 0) to its longest caption, a single image's search only to its own length.
    n = max(a.numel(), b.numel())
    return torch.equal(F.pad(a, (0, n - a.numel())), F.pad(b, (0, n - b.numel())))


def run(quick: bool = False) -> list[dict]:
    """Times batched against per-image beam search on both decoders; `quick` times the batched search once."""
    device = default_device()
    per_image_count = QUICK_PER_IMAGE if quick else None
    results = {name: compare(*make_inputs(name, device), 1 if quick else 3, per_image_count) for name in DECODERS}
    rows = []
    for name, r in results.items():
        speedup = r["per_image_s"] / r["batched_s"]
        rows.append(_row(f"beam{BEAM_SIZE}_batched_speedup_{NUM_IMAGES}_{name}", speedup, 10.0, speedup >= 10.0))
        rows.append(_row(f"beam{BEAM_SIZE}_per_image_s_{NUM_IMAGES}_{name}", r["per_image_s"]))
        rows.append(_row(f"beam{BEAM_SIZE}_batched_s_{NUM_IMAGES}_{name}", r["batched_s"]))
    speedup = min(r["per_image_s"] / r["batched_s"] for r in results.values())  # the goal holds for both decoders
    identical = sum(r["identical"] for r in results.values()) / len(results)
    return [
        _row(f"beam{BEAM_SIZE}_batched_speedup_{NUM_IMAGES}", speedup, goal=10.0, ok=speedup >= 10.0),
        _row(f"beam{BEAM_SIZE}_identical_captions", identical, goal=1.0, ok=identical == 1.0),
        *rows,
    ]


if __name__ == "__main__":
    main(__doc__, run, "one batched timing; the per-image loop on 100 images, scaled to 500")
