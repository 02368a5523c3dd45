"""Captions image files with a trained capline checkpoint.

Usage (also `python -m capline.commands.caption`):

    capline caption --ckpt runs/demo/checkpoints/last.ckpt photo.jpg scans/
    capline caption --ckpt last.ckpt images/ --beam-size 5 --batch-size 64 --json --device cuda
    capline caption --ckpt last.ckpt images/ --out annotated/   # captioned images, attention figures

Any JPEG or PNG is read (grayscale, CMYK, palette, alpha, 16-bit) and preprocessed exactly as in training.
A directory stands for its *.jpg, *.jpeg and *.png files. Prints `path<TAB>caption` per image, or with `--json`
one `{"image": ..., "caption": ...}` object per line. With `--out`, writes `<stem>_caption.png` (the image with
its caption under it) and, for attention decoders, `<stem>_attention.png` (one panel per word).

Unreadable images: one warning line each on stderr, and the run goes on. Exit codes: 0 when at least one image
was captioned, 1 when none was, 2 for a bad checkpoint or argument (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from capline.checkpoints import CheckpointError
from capline.inference import Captioner, find_images, load_caption_module, save_outputs

PROG = "capline caption"
EXIT_NONE_CAPTIONED, EXIT_ERROR = 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage block, like every other error of this tool.
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Caption image files with a trained capline checkpoint.")
    parser.add_argument("images", nargs="+", help="image files and directories of *.jpg, *.jpeg, *.png")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `capline fit`")
    parser.add_argument("--beam-size", type=_positive_int, help="beams per image (default: test_beam_size)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help='print {"image": ..., "caption": ...} lines')
    parser.add_argument("--out", type=Path, help="folder for captioned images and attention figures")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--run-config", help="the run's config.yaml, for checkpoints that do not record their model")
    return parser.parse_args(argv)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # photo.jpg and photo.png, or two folders with the same file name
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: error: --device cuda was given but torch sees no CUDA device; use cpu", file=sys.stderr)
        return EXIT_ERROR
    try:
        module = load_caption_module(args.ckpt, args.run_config)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
    except (CheckpointError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    captioner = Captioner(module, device=device, beam_size=args.beam_size)
    captioned, failed, stems = 0, 0, set()
    results = captioner.caption_files(find_images(args.images), args.batch_size, keep_images=args.out is not None)
    for result in results:
        if result.error is not None:
            failed += 1
            print(f"{PROG}: warning: skipped {result.path}: {result.error}", file=sys.stderr, flush=True)
            continue
        captioned += 1
        if args.json:
            print(json.dumps({"image": str(result.path), "caption": result.caption}), flush=True)
        else:
            print(f"{result.path}\t{result.caption}", flush=True)
        if args.out is not None:
            save_outputs(result, args.out, _unique_stem(result.path, stems))
    if failed:
        print(f"{PROG}: {failed} of {failed + captioned} images could not be read", file=sys.stderr)
    if not captioned:
        print(f"{PROG}: error: no image could be captioned", file=sys.stderr)
        return EXIT_NONE_CAPTIONED
    return 0


if __name__ == "__main__":
    sys.exit(main())
