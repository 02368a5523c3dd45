"""Checks whether `capline caption` tells the truth about synthetic scenes no run has seen.

    capline scene-check --ckpt runs/demo/checkpoints/last.ckpt            # 500 scenes, default beam
    capline scene-check --ckpt last.ckpt --num 500 --beam-size 1 --json   # greedy, figures as JSON

Draws `--num` scenes the demo never trains or validates on (indices from 1,500,000,000 on), writes them as
JPEG files, captions them with the real `capline caption` (as a user would: its default beam size is the
checkpoint's `test_beam_size`), and judges every caption against what was drawn (`capline.metrics.scene_truth`):
`scene_accuracy` (exactly true), `objects_correct`, `relation_correct`. Prints the figures and a few false
captions with the truth beside them. Exit status 0, or 2 when `capline caption` failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from capline.data.synthetic import decode_scene, encode_scene, generate_scene, scene_captions, scene_record
from capline.metrics.scene_truth import judge_caption
from capline.vocab import tokenize

UNSEEN_INDEX_OFFSET = 1_500_000_000  # beyond every training (< 1e9) and validation (1e9 + i) scene


def write_scenes(folder: Path, num: int, seed: int, image_size: int) -> dict[str, list[int]]:
    """Writes `num` unseen scenes as `<index>.jpg`; returns their `encode_scene` codes by file name."""
    codes = {}
    for i in range(num):
        index = UNSEEN_INDEX_OFFSET + i
        image, _, attributes = generate_scene(index, seed, image_size)
        name = f"{index}.jpg"
        image.save(folder / name, quality=95, subsampling=0)  # as the shard writer stores scenes: full chroma
        codes[name] = encode_scene(scene_record(attributes))[0]
    return codes


def caption_files(folder: Path, ckpt: str, beam_size: int | None) -> dict[str, str]:
    """Runs the real `capline caption --json` over a folder; returns captions by file name."""
    command = [sys.executable, "-m", "capline", "caption", "--ckpt", ckpt, str(folder), "--json"]
    if beam_size is not None:
        command += ["--beam-size", str(beam_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "capline caption failed")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {Path(line["image"]).name: line["caption"] for line in lines}


def judge_all(captions: dict[str, str], codes: dict[str, list[int]]) -> tuple[dict, list[str]]:
    totals, false = [0, 0, 0], []
    for name, scene in codes.items():
        verdict = judge_caption(tokenize(captions.get(name, "")), scene)
        totals = [t + v for t, v in zip(totals, verdict)]
        if not verdict[0] and len(false) < 5:
            truth = scene_captions(*decode_scene(scene))[0]
            false.append(f"{name}: {captions.get(name, '(none)')!r}, but the scene is {truth!r}")
    n = len(codes)
    figures = dict(zip(("scene_accuracy", "objects_correct", "relation_correct"), (t / n for t in totals)))
    return {**figures, "num_scenes": n}, false


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capline scene-check", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `capline fit` on the demo data")
    parser.add_argument("--num", type=int, default=500, help="unseen scenes to caption")
    parser.add_argument("--beam-size", type=int, help="passed to capline caption (default: its own, test_beam_size)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset seed (data.synthetic.seed)")
    parser.add_argument("--image-size", type=int, default=64, help="data.synthetic.image_size")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        codes = write_scenes(Path(tmp), args.num, args.seed, args.image_size)
        try:
            captions = caption_files(Path(tmp), args.ckpt, args.beam_size)
        except RuntimeError as err:
            print(f"capline scene-check: error: {err}", file=sys.stderr)
            return 2
    figures, false = judge_all(captions, codes)
    figures["beam_size"] = args.beam_size or "default"
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{args.num} unseen scenes, capline caption beam size {figures['beam_size']}:")
    for name in ("scene_accuracy", "objects_correct", "relation_correct"):
        print(f"  {name:17s} {figures[name]:.3f}")
    if false:
        print("some false captions:")
        print("\n".join(f"  {line}" for line in false))
    return 0


if __name__ == "__main__":
    sys.exit(main())
