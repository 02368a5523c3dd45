"""The CIDEr-D of the best single constant caption on a split: the floor a captioner must beat by far.

    python tools/caption_floor.py --shards "data/synthetic/val-{000000..000000}.tar"

Every distinct reference caption of the split is tried as the caption of every image; the best one is printed
with its CIDEr-D (document frequencies from the split's references, as in validation). A model that ignores the
image cannot do better than this.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections import Counter

import webdataset as wds

from capline.metrics import CiderD
from capline.vocab import tokenize


def read_references(pattern: str) -> dict[str, list[str]]:
    """Image key -> its tokenised reference captions, read from the shards' `.json` members only."""
    references = {}
    for url in wds.shardlists.expand_urls(pattern):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    references[member.name.rsplit(".", 1)[0]] = [" ".join(tokenize(c)) for c in meta["captions"]]
    return references


def best_constant_caption(references: dict[str, list[str]], top: int | None = None) -> tuple[str, float]:
    """Tries every distinct reference (or the `top` most frequent) as a constant caption; returns the best."""
    counts = Counter(c for refs in references.values() for c in refs)
    candidates = [c for c, _ in counts.most_common(top)]
    scorer = CiderD.from_references(references)
    scored = [(scorer.score(references, dict.fromkeys(references, c))[0], c) for c in candidates]
    score, caption = max(scored)
    return caption, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="brace pattern of the split's shards")
    parser.add_argument("--top", type=int, default=None, help="try only the N most frequent references")
    args = parser.parse_args(argv)
    references = read_references(args.shards)
    if not references:
        print(f"caption_floor.py: error: no captions in {args.shards!r}", file=sys.stderr)
        return 2
    caption, score = best_constant_caption(references, args.top)
    print(f"images: {len(references)}")
    print(f"best constant caption: {caption!r}")
    print(f"CIDEr-D: {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
