"""Draws the README's photo picture: the first test photos with their beam-search captions and one reference each,
and, for the first of them, where the attention decoder looks for each word.

    python tools/photos_figure.py --ckpt runs/flickr8k_cpu/checkpoints/last.ckpt \
        --images data/flickr8k/images --split-file Flickr_8k.testImages.txt --captions Flickr8k.token.txt \
        --out docs/photos.png

The photos are the first `--num` names of the split list, in its order (no picking); each is captioned as `capline
test` does (the checkpoint's beam size), and shown with the first of its five reference captions.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from capline.data.flickr import load_flickr_captions, load_split_list
from capline.inference import Captioner, attention_figure, load_caption_module, save_figures


def photo_grid(results, references: list[str], columns: int = 4) -> Figure:
    rows = -(-len(results) // columns)
    figure = Figure(figsize=(columns * 3.2, rows * 4.1), dpi=80)
    figure.suptitle(f"the first {len(results)} Flickr8k test photos: model caption (bold) and a reference", fontsize=13)
    for index, (result, reference) in enumerate(zip(results, references)):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(result.model_input.permute(1, 2, 0).numpy())
        model = "\n".join(textwrap.wrap(result.caption, 34))
        truth = "\n".join(textwrap.wrap(f"ref: {reference}", 40))
        ax.set_title(model, fontsize=9, fontweight="bold", loc="left")
        ax.set_xlabel(truth, fontsize=8, loc="left", color="#444444")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `capline fit`")
    parser.add_argument("--images", type=Path, required=True, help="the folder of the Flickr8k photos")
    parser.add_argument("--split-file", type=Path, required=True, help="e.g. Flickr_8k.testImages.txt")
    parser.add_argument("--captions", type=Path, required=True, help="Flickr8k.token.txt")
    parser.add_argument("--num", type=int, default=16, help="photos in the grid")
    parser.add_argument("--out", type=Path, default=Path("docs/photos.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    names = load_split_list(args.split_file)[: args.num]
    captions, _ = load_flickr_captions(args.captions)
    captioner = Captioner(load_caption_module(args.ckpt))
    results = [captioner.read(args.images / name) for name in names]
    failed = [r for r in results if r.error]
    if failed:
        print(f"photos_figure.py: error: {failed[0].path}: {failed[0].error}", file=sys.stderr)
        return 2
    captioner.caption(results)
    panels = [photo_grid(results, [captions[name][0] for name in names])]
    first = results[0]
    if first.attention is not None:
        panels.append(attention_figure(first.model_input, first.tokens, first.attention))
    save_figures(panels, args.out)
    for name, result in zip(names, results):
        print(f"{name}\t{result.caption}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
