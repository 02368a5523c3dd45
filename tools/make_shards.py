"""Writes capline's WebDataset shards: COCO captions, or the synthetic demo scenes.

COCO 2014 with the Karpathy splits (images in coco/train2014/ and coco/val2014/):

    python tools/make_shards.py coco --images coco --out shards/coco --split train --max-size 256 --workers 8 \
        --annotations coco/annotations/captions_train2014.json coco/annotations/captions_val2014.json \
        --karpathy dataset_coco.json --karpathy-split train+restval
    python tools/make_shards.py coco --images coco --out shards/coco --split val --max-size 256 \
        --annotations coco/annotations/captions_val2014.json --karpathy dataset_coco.json --karpathy-split val

The official 2017 split (a training split also writes the vocabulary, words seen >= --min-count times):

    python tools/make_shards.py coco --images coco/train2017 --out shards/coco17 --split train \
        --annotations coco/annotations/captions_train2017.json

The synthetic scenes, then the config lines that point at them:

    python tools/make_shards.py synthetic --out data/synthetic --num-train 8000 --num-val 500

Exit status: 0 on success, 1 when no image could be written, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from capline.data.coco import (
    CocoFormatError,
    load_coco_annotations,
    load_karpathy_split,
    select_images,
    write_coco_shards,
)
from capline.data.synthetic import ensure_synthetic_dataset
from capline.vocab import Vocabulary


class UsageError(Exception):
    """A bad argument, reported as one sentence with exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser("coco", help="COCO captions (official annotations, optionally Karpathy splits)")
    coco.add_argument("--images", type=Path, required=True, help="image folder (searched with its subfolders)")
    coco.add_argument("--annotations", type=Path, nargs="+", default=[], help="captions_*.json file(s)")
    coco.add_argument("--out", type=Path, required=True, help="output folder")
    coco.add_argument("--split", required=True, help="output split name: NAME-000000.tar, ...")
    coco.add_argument("--max-size", type=int, help="shrink images to this short side (default: copy as is)")
    coco.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    coco.add_argument("--karpathy", type=Path, help="Karpathy split file dataset_coco.json")
    coco.add_argument("--karpathy-split", help="train, val, test, restval or e.g. train+restval")
    coco.add_argument("--vocab", action="store_true", help="write vocab.json (default: only for train* splits)")
    coco.add_argument("--min-count", type=int, default=5, help="vocabulary: keep words seen this many times")
    coco.add_argument("--workers", type=int, default=1, help="processes decoding and resizing images")
    coco.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    synthetic = commands.add_parser("synthetic", help="procedural two-object scenes (the demo dataset)")
    synthetic.add_argument("--out", type=Path, required=True, help="output folder")
    synthetic.add_argument("--num-train", type=int, required=True, help="training scenes")
    synthetic.add_argument("--num-val", type=int, required=True, help="validation scenes")
    synthetic.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synthetic.add_argument("--seed", type=int, default=0, help="dataset seed")
    synthetic.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    return parser.parse_args(argv)


def check_coco_args(args: argparse.Namespace) -> None:
    """Rejects bad COCO arguments before any heavy work."""
    if not args.images.is_dir():
        raise UsageError(f"--images {str(args.images)!r} is not a directory")
    if not args.annotations and args.karpathy is None:
        raise UsageError("give --annotations (captions_*.json) or --karpathy (dataset_coco.json)")
    if (args.karpathy is None) != (args.karpathy_split is None):
        raise UsageError("--karpathy and --karpathy-split go together: give both or neither")
    for name in ("max_size", "shard_size", "min_count", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def run_coco(args: argparse.Namespace) -> int:
    check_coco_args(args)
    try:
        annotations = load_coco_annotations(args.annotations)
        karpathy = load_karpathy_split(args.karpathy, args.karpathy_split) if args.karpathy else None
    except (CocoFormatError, ValueError) as err:
        raise UsageError(str(err)) from None
    images = select_images(annotations, karpathy)
    report = write_coco_shards(
        images,
        args.images,
        args.out,
        args.split,
        args.max_size,
        args.shard_size,
        args.workers,
        progress=not args.no_progress,
    )
    vocab_note = ""
    if report.written and (args.split.startswith("train") or args.vocab):
        vocab = Vocabulary.build((c for img in report.written for c in img.captions), min_count=args.min_count)
        vocab.save(args.out / "vocab.json")
        vocab_note = f", vocabulary of {len(vocab)} words in {args.out / 'vocab.json'}"
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items())) or "none"
    print(
        f"wrote {len(report.written)} samples in {report.num_shards} shards to {args.out}{vocab_note}; "
        f"skipped {sum(report.skipped.values())} ({skipped})"
    )
    return 0 if report.written else 1


def run_synthetic(args: argparse.Namespace) -> int:
    for name in ("num_train", "num_val", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.image_size < 32 or args.seed < 0:
        raise UsageError(f"--image-size must be >= 32 and --seed >= 0, got {args.image_size} and {args.seed}")
    info = ensure_synthetic_dataset(args.out, args.num_train, args.num_val, args.image_size, args.seed, args.shard_size)
    print(f"data.train_shards: {info['train_shards']}")
    print(f"data.val_shards: {info['val_shards']}")
    print(f"data.vocab: {info['vocab']}")
    action = "reused" if info["reused"] else "wrote"
    print(
        f"{action} {info['num_train'] + info['num_val']} samples (train {info['num_train']}, "
        f"val {info['num_val']}) in {info['num_train_shards'] + info['num_val_shards']} shards "
        f"(train {info['num_train_shards']}, val {info['num_val_shards']}) to {args.out}; skipped 0"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_coco(args) if args.command == "coco" else run_synthetic(args)
    except UsageError as err:
        print(f"make_shards.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
