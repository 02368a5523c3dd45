"""Writes capline's WebDataset shards: COCO captions, or the synthetic demo scenes.

COCO 2014 with the Karpathy splits (images in coco/train2014/ and coco/val2014/):

    capline shards coco --images coco --out shards/coco --split train --max-size 256 --workers 8 \
        --annotations coco/annotations/captions_train2014.json coco/annotations/captions_val2014.json \
        --karpathy dataset_coco.json --karpathy-split train+restval
    capline shards coco --images coco --out shards/coco --split val --max-size 256 \
        --annotations coco/annotations/captions_val2014.json --karpathy dataset_coco.json --karpathy-split val

The official 2017 split (a training split also writes the vocabulary, words seen >= --min-count times):

    capline shards coco --images coco/train2017 --out shards/coco17 --split train \
        --annotations coco/annotations/captions_train2017.json

The synthetic scenes, then the config lines that point at them:

    capline shards synthetic --out data/synthetic --num-train 8000 --num-val 500

Flickr8k (or Flickr30k's results_20130124.token / results.csv) with its split lists, or any of Karpathy's files:

    capline shards flickr --images Flicker8k_Dataset --captions Flickr8k.token.txt \
        --split-file Flickr_8k.trainImages.txt --split train --out shards/flickr8k
    capline shards karpathy --dataset dataset_flickr8k.json --images Flicker8k_Dataset \
        --karpathy-split train --split train --out shards/flickr8k

Shards made elsewhere (img2dataset, CLIP-benchmark, any layout data.format reads): their vocabulary, and a
sample-count index (capline-counts.json) so training need not count them at start-up:

    capline shards vocab --shards "mscoco/{00000..00059}.tar" --out mscoco/vocab.json
    capline shards index --shards "mscoco/{00000..00059}.tar"

Exit status: 0 on success, 1 when no image could be written, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from capline.data.coco import (
    CocoFormatError,
    CocoImage,
    load_coco_annotations,
    load_karpathy_split,
    select_images,
    write_coco_shards,
)
from capline.data.counting import COUNTS_FILE, write_counts
from capline.data.decode import SkipCounter
from capline.data.flickr import flickr_images, load_flickr_captions, load_karpathy_images, load_split_list
from capline.data.groups import shard_captions
from capline.data.layouts import FORMATS, LayoutReader
from capline.data.shardlist import DataConfigError, expand_shards
from capline.data.synthetic import ensure_synthetic_dataset
from capline.data.usable import NoUsableDataError, detect_shard_layout
from capline.vocab import Vocabulary

log = logging.getLogger("capline.shards")


class UsageError(Exception):
    """A bad argument, reported as one sentence with exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capline shards", description=__doc__.splitlines()[0])
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

    flickr = commands.add_parser("flickr", help="Flickr8k / Flickr30k caption files (name.jpg#i<TAB>caption)")
    flickr.add_argument(
        "--captions", type=Path, required=True, help="Flickr8k.token.txt, results_20130124.token or results.csv"
    )
    flickr.add_argument("--split-file", type=Path, help="image list of the split, e.g. Flickr_8k.trainImages.txt")
    karpathy = commands.add_parser("karpathy", help="any of Karpathy's dataset_{coco,flickr8k,flickr30k}.json")
    karpathy.add_argument("--dataset", type=Path, required=True, help="dataset_flickr8k.json, ...")
    karpathy.add_argument("--karpathy-split", required=True, help="train, val, test, restval or e.g. train+restval")
    for command in (flickr, karpathy):
        command.add_argument("--images", type=Path, required=True, help="image folder (searched with its subfolders)")
        command.add_argument("--out", type=Path, required=True, help="output folder")
        command.add_argument("--split", required=True, help="output split name: NAME-000000.tar, ...")
        command.add_argument("--max-size", type=int, help="shrink images to this short side (default: copy as is)")
        command.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        command.add_argument("--vocab", action="store_true", help="write vocab.json (default: only for train* splits)")
        command.add_argument("--min-count", type=int, default=5, help="vocabulary: keep words seen this many times")
        command.add_argument("--workers", type=int, default=1, help="processes decoding and resizing images")
        command.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    vocab = commands.add_parser("vocab", help="vocabulary of any readable shards (img2dataset, CLIP-benchmark, ...)")
    vocab.add_argument("--out", type=Path, required=True, help="vocab.json to write")
    vocab.add_argument("--min-count", type=int, default=5, help="keep words seen this many times")
    vocab.add_argument("--format", default="auto", choices=FORMATS, help="shard layout (default: detected)")
    index = commands.add_parser("index", help=f"write {COUNTS_FILE}: the samples of each local shard")
    for command in (vocab, index):
        command.add_argument("--shards", required=True, help="brace pattern or URL, e.g. 'dir/{00000..00009}.tar'")

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
    return write_images(args, select_images(annotations, karpathy))


def check_image_args(args: argparse.Namespace, files: tuple[str, ...]) -> None:
    """Rejects bad Flickr / Karpathy arguments before any heavy work."""
    if not args.images.is_dir():
        raise UsageError(f"--images {str(args.images)!r} is not a directory")
    for name in files:
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise UsageError(f"--{name.replace('_', '-')} {str(path)!r} does not exist")
    for name in ("max_size", "shard_size", "min_count", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def run_flickr(args: argparse.Namespace) -> int:
    check_image_args(args, ("captions", "split_file"))
    try:
        captions, malformed = load_flickr_captions(args.captions)
        names = load_split_list(args.split_file) if args.split_file else None
    except CocoFormatError as err:
        raise UsageError(str(err)) from None
    if malformed:
        shown = ", ".join(map(str, malformed[:5])) + (", ..." if len(malformed) > 5 else "")
        print(f"skipped {len(malformed)} malformed line(s) of {args.captions}: line {shown}", file=sys.stderr)
    return write_images(args, flickr_images(captions, names))


def run_karpathy(args: argparse.Namespace) -> int:
    check_image_args(args, ("dataset",))
    try:
        images = load_karpathy_images(args.dataset, args.karpathy_split)
    except (CocoFormatError, ValueError) as err:
        raise UsageError(str(err)) from None
    if not images:
        raise UsageError(f"{args.dataset} lists no image of the Karpathy split {args.karpathy_split!r}")
    return write_images(args, images)


def write_images(args: argparse.Namespace, images: list[CocoImage]) -> int:
    """Writes the images' shards (and, for a training split, vocab.json) and prints what was written."""
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


def reader_for(args: argparse.Namespace, urls: list[str]) -> LayoutReader:
    try:
        layout = args.format if args.format != "auto" else detect_shard_layout(urls, "shards", announce=log.info)
    except NoUsableDataError as err:
        raise UsageError(str(err).replace("data.shards: ", "--shards: ")) from None
    return LayoutReader(layout)


def shard_urls(pattern: str) -> list[str]:
    try:
        return expand_shards(pattern, "shards")
    except DataConfigError as err:
        raise UsageError(str(err).replace("data.shards", "--shards")) from None


def run_vocab(args: argparse.Namespace) -> int:
    if args.min_count < 1:
        raise UsageError(f"--min-count must be at least 1, got {args.min_count}")
    urls = shard_urls(args.shards)
    reader, counter, samples = reader_for(args, urls), SkipCounter(), 0

    def captions():
        nonlocal samples
        for texts in shard_captions(urls, reader, counter):
            samples += 1
            yield from texts

    vocab = Vocabulary.build(captions(), min_count=args.min_count)
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.pending.items()) if n) or "none"
    if not samples:
        raise UsageError(f"--shards {args.shards!r}: no sample has a caption ({reader.layout} layout; {skipped})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(args.out)
    print(
        f"vocabulary of {len(vocab)} words (seen >= {args.min_count} times) from {samples} {reader.layout} samples "
        f"of {len(urls)} shards in {args.out}; skipped {sum(counter.pending.values())} ({skipped})"
    )
    return 0


def run_index(args: argparse.Namespace) -> int:
    urls = shard_urls(args.shards)
    try:
        indexes = write_counts(urls)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for path, index in indexes.items():
        print(f"{path}: {index['num_samples']} samples in {len(index['shards'])} shards")
    return 0


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
    commands = {"coco": run_coco, "flickr": run_flickr, "karpathy": run_karpathy, "vocab": run_vocab,
                "index": run_index, "synthetic": run_synthetic}  # fmt: skip
    try:
        return commands[args.command](args)
    except UsageError as err:
        print(f"capline shards: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
