"""Draws the README's demo picture from a checkpoint: validation scenes with their captions, true ones and
false ones marked, and one word-by-word attention strip.

    python tools/demo_figure.py --ckpt runs/demo/checkpoints/last.ckpt --out docs/demo.png

The scenes are the first `--num` validation scenes of the demo data (no picking), captioned as `capline
validate` does (greedy, or `--beam-size`), each judged against what the generator drew
(`capline.metrics.scene_truth`). The strip shows, for the first scene captioned truly, where the attention
decoder looks for each word, upsampled from its feature grid over the image.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capline.data.synthetic import VAL_INDEX_OFFSET, encode_scene, generate_scene, scene_record  # noqa: E402
from capline.inference import Captioner, CaptionResult, load_caption_module, save_figures  # noqa: E402
from capline.metrics.scene_truth import judge_caption  # noqa: E402

PANEL_PX = 192  # each scene is drawn at this size (nearest-neighbour: the pixels the model saw, only larger)
TRUE_COLOUR, FALSE_COLOUR = "#1a7f37", "#cf222e"


def caption_scenes(captioner: Captioner, num: int, seed: int, image_size: int) -> list[tuple[CaptionResult, bool]]:
    """Captions validation scenes 0..num-1 and judges each caption against its scene."""
    results, codes = [], []
    for i in range(num):
        image, _, attributes = generate_scene(VAL_INDEX_OFFSET + i, seed, image_size)
        results.append(CaptionResult(Path(f"val-{i}"), image=image, model_input=captioner.transform(image)))
        codes.append(encode_scene(scene_record(attributes))[0])
    captioner.caption(results)
    return [(r, judge_caption(r.caption.split(), c)[0]) for r, c in zip(results, codes)]


def _upscaled(model_input: torch.Tensor) -> np.ndarray:
    picture = model_input.unsqueeze(0).float()  # (1, 3, S, S)
    return F.interpolate(picture, size=(PANEL_PX, PANEL_PX), mode="nearest")[0].permute(1, 2, 0).byte().numpy()


def scene_grid(judged: list[tuple[CaptionResult, bool]], columns: int = 4) -> Figure:
    rows = -(-len(judged) // columns)
    figure = Figure(figsize=(columns * 2.6, rows * 3.4), dpi=80)
    true_count = sum(true for _, true in judged)
    figure.suptitle(f"{true_count} of {len(judged)} captions true (first {len(judged)} validation scenes)", fontsize=12)
    for index, (result, true) in enumerate(judged):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(_upscaled(result.model_input))
        mark = "TRUE" if true else "FALSE"
        ax.set_title(f"{mark}\n" + "\n".join(textwrap.wrap(result.caption, 30)), fontsize=8,
                     color=TRUE_COLOUR if true else FALSE_COLOUR)  # fmt: skip
        for spine in ax.spines.values():
            spine.set_edgecolor(TRUE_COLOUR if true else FALSE_COLOUR)
            spine.set_linewidth(3)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    return figure


def attention_strip(result: CaptionResult, columns: int = 8) -> Figure:
    """One panel per word (and `<end>`): the attention weights, upsampled bilinearly, over the scene."""
    picture = _upscaled(result.model_input)
    weights = torch.from_numpy(result.attention).float().unsqueeze(1)  # (L, 1, h, w)
    heatmaps = F.interpolate(weights, size=(PANEL_PX, PANEL_PX), mode="bilinear", align_corners=False)[:, 0]
    rows = -(-len(result.tokens) // columns)
    grid = "x".join(map(str, result.attention.shape[1:]))
    figure = Figure(figsize=(columns * 1.6, rows * 1.9 + 0.4), dpi=80)
    figure.suptitle(f'where the decoder looks for each word ({grid} feature grid): "{result.caption}"', fontsize=10)
    for index, (word, heatmap) in enumerate(zip(result.tokens, heatmaps.numpy())):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(picture)
        ax.imshow(heatmap, cmap="inferno", alpha=0.5, vmin=0.0, vmax=max(float(heatmap.max()), 1e-8))
        ax.set_title(word, fontsize=10)
        ax.axis("off")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `capline fit` on the demo data")
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"), help="the PNG to write")
    parser.add_argument("--num", type=int, default=12, help="validation scenes in the grid")
    parser.add_argument("--beam-size", type=int, default=1, help="1 (greedy) is what validation scores")
    parser.add_argument("--seed", type=int, default=0, help="data.synthetic.seed")
    parser.add_argument("--image-size", type=int, default=64, help="data.synthetic.image_size")
    args = parser.parse_args(argv)
    captioner = Captioner(load_caption_module(args.ckpt), beam_size=args.beam_size)
    judged = caption_scenes(captioner, args.num, args.seed, args.image_size)
    panels = [scene_grid(judged)]
    shown = next((r for r, true in judged if true and r.attention is not None), None)
    if shown is not None:
        panels.append(attention_strip(shown))
    save_figures(panels, args.out)
    print(f"wrote {args.out}: {sum(t for _, t in judged)} of {len(judged)} captions true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
