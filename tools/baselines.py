"""Two captioners without a decoder, scored on a test split with the official COCO metrics.

    python tools/baselines.py --config configs/flickr8k_cpu.yaml \
        --train-shards "data/flickr8k-shards/train-{000000..000005}.tar" \
        --test-shards data/flickr8k-shards/test-000000.tar --out runs/baselines.json

- **constant**: the one training caption that, given to every training image, scores the highest CIDEr-D
  against the training references (chosen without looking at the test split), then given to every test image.
- **nearest neighbour** (Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for Image Captioning"): the
  config's pretrained encoder, globally average-pooled, finds each test image's `k` most similar training images
  (cosine); of their captions, the one that agrees most with the others (mean CIDEr-D against them, the "consensus
  caption") is the test image's caption.

A captioner that cannot beat retrieval from its own training set has learnt little; one near the constant caption
ignores the image.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml

from capline.data.collate import ImageTransform
from capline.data.decode import open_image, parse_meta
from capline.metrics import CiderD, evaluate_coco
from capline.models import TimmEncoder
from capline.vocab import tokenize


def read_split(pattern: str, with_images: bool) -> tuple[list[int], list[list[str]], list[bytes]]:
    """(image ids, raw reference captions, JPEG bytes or nothing) of every sample of the shards, in order."""
    ids, captions, images = [], [], []
    for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
        image_id, refs, _ = parse_meta(sample.get("json"))
        ids.append(image_id)
        captions.append(refs)
        if with_images:
            images.append(next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample))
    return ids, captions, images


def best_constant_caption(references: list[list[str]], top: int = 300) -> str:
    """Of the `top` most frequent training captions (tokenised), the one with the highest CIDEr-D over the
    training images when every image gets it."""
    refs = {i: [" ".join(tokenize(c)) for c in group] for i, group in enumerate(references)}
    counts = Counter(c for group in refs.values() for c in group)
    scorer = CiderD.from_references(refs)
    return max(counts.most_common(top), key=lambda item: scorer.score(refs, dict.fromkeys(refs, item[0]))[0])[0]


def consensus_caption(candidates: list[str], scorer: CiderD) -> str:
    """The candidate with the highest mean CIDEr-D against all the other candidates (Devlin et al. 2015), with the
    n-gram document frequencies of `scorer`'s corpus (the training captions)."""
    tokenised = [" ".join(tokenize(c)) for c in candidates]
    others = {i: tokenised[:i] + tokenised[i + 1 :] for i in range(len(tokenised))}
    _, scores = scorer.score(others, dict(enumerate(tokenised)))
    return candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]


def caption_scorer(captions: list[list[str]]) -> CiderD:
    """CIDEr-D with the document frequencies of a caption corpus: one group per image."""
    return CiderD.from_references([[" ".join(tokenize(c)) for c in group] for group in captions])


def nearest_neighbour_captions(
    train_features: torch.Tensor, train_captions: list[list[str]], test_features: torch.Tensor, k: int = 25
) -> list[str]:
    """For each test feature row, the consensus caption of the captions of its `k` most similar training rows."""
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    test = torch.nn.functional.normalize(test_features.float(), dim=1)
    nearest = (test @ train.T).topk(min(k, len(train)), dim=1).indices  # (N_test, k)
    scorer = caption_scorer(train_captions)
    return [consensus_caption([c for j in row.tolist() for c in train_captions[j]], scorer) for row in nearest]


@torch.no_grad()
def pooled_features(encoder: TimmEncoder, images: list[bytes], batch_size: int = 64) -> torch.Tensor:
    """Global average pool of the encoder's last feature map, (N, C), images prepared as in training."""
    encoder.eval()
    transform = ImageTransform(encoder.data_config)
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(open_image(raw, None)) for raw in images[start : start + batch_size]])
        rows.append(encoder(batch.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)))
    return torch.cat(rows)


def encoder_of(config_path: str) -> TimmEncoder:
    """The config's `model.encoder`, built as `capline fit` builds it (pretrained weights included)."""
    encoder = yaml.safe_load(Path(config_path).read_text())["model"]["encoder"]
    if encoder.get("class_path", "capline.models.TimmEncoder").rsplit(".", 1)[-1] != "TimmEncoder":
        raise ValueError(f"{config_path}: model.encoder must be a capline.models.TimmEncoder")
    return TimmEncoder(**encoder.get("init_args", {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a capline config: its model.encoder is used")
    parser.add_argument("--train-shards", required=True, help="brace pattern of the training shards")
    parser.add_argument("--test-shards", required=True, help="brace pattern of the test shards")
    parser.add_argument("--k", type=int, default=25, help="nearest training images per test image")
    parser.add_argument("--top", type=int, default=300, help="constant caption: candidates among the most frequent")
    parser.add_argument("--out", help="write the scores and captions as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        encoder = encoder_of(args.config)
        _, train_caps, train_images = read_split(args.train_shards, with_images=True)
        test_ids, test_caps, test_images = read_split(args.test_shards, with_images=True)
    except (OSError, ValueError) as err:
        print(f"baselines.py: error: {err}", file=sys.stderr)
        return 2
    references = dict(zip(test_ids, test_caps))
    constant = best_constant_caption(train_caps, args.top)
    captions = nearest_neighbour_captions(
        pooled_features(encoder, train_images), train_caps, pooled_features(encoder, test_images), args.k
    )
    results = {
        "constant": {"caption": constant, "scores": evaluate_coco(references, dict.fromkeys(test_ids, constant))},
        "nearest_neighbour": {
            "k": args.k, "scores": evaluate_coco(references, dict(zip(test_ids, captions))),
            "captions": dict(zip(map(str, test_ids), captions)),
        },
    }  # fmt: skip
    names = list(results["constant"]["scores"])
    print(f"{len(test_ids)} test images, {len(train_caps)} training images; constant caption: {constant!r}")
    print(f"{'baseline':<20}" + "".join(f"{n:>9}" for n in names))
    for name, result in results.items():
        print(f"{name:<20}" + "".join(f"{result['scores'][n]:>9.3f}" for n in names))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
