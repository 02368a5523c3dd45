"""Procedural two-object scenes: the embedded demo dataset that trains on a CPU in minutes.

Each image shows two objects (shape, colour, size) with a spatial relation of the first to the second, on a dark
or neutral background. Its five reference captions are worded differently but all follow from what is drawn, so
a model can only caption well by looking at the image. Scene `i` depends only on `(seed, i)`: the same whatever
the shard size or the number of processes.

    info = ensure_synthetic_dataset("data/synthetic", num_train=8000, num_val=500)
    info["train_shards"]  # "data/synthetic/train-{000000..000015}.tar"
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from capline.data.shards import ShardWriter, encode_jpeg, index_path, shard_pattern
from capline.vocab import Vocabulary

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated or bright colours, each with a channel >= 200: far from every background tone below.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 220),
    "white": (240, 240, 240),
}
SIZES = {"small": (0.17, 0.22), "large": (0.33, 0.40)}  # side length as a fraction of the image side
RELATIONS = ("left", "right", "above", "below")  # of the first object to the second
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Dark, low-saturation tones (every channel <= 70) that no object colour can be mistaken for.
_BACKGROUND_TONES = ((16, 16, 16), (40, 40, 40), (66, 66, 66), (44, 36, 30), (26, 32, 40), (46, 54, 44))
_NOISE_STD = 6.0

_MARGIN = 0.03  # free border, as a fraction of the image side
_GAP = 0.06  # free band between the two halves the objects are placed in
VAL_INDEX_OFFSET = 1_000_000_000  # validation scene i is scene VAL_INDEX_OFFSET + i: never a training scene
GENERATOR_VERSION = 2  # bump when drawing or captions change, so that stored datasets are regenerated
MANIFEST_NAME = "synthetic.json"


def generate_scene(index: int, seed: int = 0, image_size: int = 64) -> tuple[Image.Image, list[str], dict]:
    """Draws scene `index` and returns it with its five reference captions.

    Args:
        index: Scene number, >= 0. The scene depends only on `(seed, index)`.
        seed: Dataset seed, >= 0.
        image_size: Side of the square RGB image in pixels, >= 32. Geometry scales with it: the same
            `(seed, index)` gives the same scene at every size.

    Returns:
        `(image, captions, attributes)`, where `attributes` is `{"index", "seed", "image_size", "relation", "objects":
        [{"shape", "colour", "size", "bbox": [x0, y0, x1, y1]}, ...], "background": {"kind", "noise"}}`, bbox
        in pixels with x1, y1 exclusive, and the relation that of `objects[0]` to `objects[1]`.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels for the shapes to be told apart, got {image_size}")
    rng = np.random.default_rng([seed, index])
    objects, relation = _draw_layout(rng, image_size)
    background, pixels = _draw_background(rng, image_size)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj["shape"], obj["bbox"], COLOURS[obj["colour"]])
    attributes = {
        "index": index, "seed": seed, "image_size": image_size, "relation": relation, "objects": objects,
        "background": background,
    }  # fmt: skip
    return image, scene_captions(objects[0], objects[1], relation), attributes


def scene_captions(first: dict, second: dict, relation: str) -> list[str]:
    """Returns five differently worded captions of `first` being `relation` of `second`.

    Args:
        first: `{"shape", "colour", "size"}` of the first object.
        second: The same for the second object.
        relation: One of `RELATIONS`.
    """
    # Every wording names both objects' size, colour and shape, so each caption states the whole scene.
    a_full = f"{first['size']} {first['colour']} {first['shape']}"
    b_full = f"{second['size']} {second['colour']} {second['shape']}"
    flipped = _INVERSE[relation]
    long_phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
    short_phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    pairing = "side by side" if relation in ("left", "right") else "one above the other"
    side = {"left": "on the left", "right": "on the right", "above": "on top", "below": "at the bottom"}
    beside_it = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
    return [
        f"a {a_full} {long_phrase[relation]} a {b_full}",
        f"a {b_full} is {long_phrase[flipped]} a {a_full}",
        f"there is a {a_full} {short_phrase[relation]} a {b_full}",
        f"a {a_full} and a {b_full} {pairing} with the {first['shape']} {side[relation]}",
        f"a {b_full} with a {a_full} {beside_it[relation]}",
    ]


def scene_record(attributes: dict) -> dict:
    """The part of `generate_scene`'s attributes that says what is true of the scene, as stored in the shards:
    `{"relation", "image_size", "objects": [{"shape", "colour", "size", "bbox"}, ...]}`."""
    keep = ("shape", "colour", "size", "bbox")
    objects = [{k: obj[k] for k in keep} for obj in attributes["objects"]]
    return {"relation": attributes["relation"], "image_size": attributes["image_size"], "objects": objects}


def encode_scene(scene: dict | None) -> tuple[list[int], list[list[float]]] | None:
    """A scene record as batch-ready numbers, or None when it is not a well-formed record of this generator.

    Returns:
        `(codes, boxes)`: codes `[shape0, colour0, size0, shape1, colour1, size1, relation]` as indices into
        `SHAPES`, `COLOURS`, `SIZES` and `RELATIONS`; boxes `[[x0, y0, x1, y1], ...]` as fractions of the image.
    """
    try:
        objects, side = scene["objects"], float(scene["image_size"])
        codes = []
        for obj in objects:
            codes += [SHAPES.index(obj["shape"]), list(COLOURS).index(obj["colour"]), list(SIZES).index(obj["size"])]
        codes.append(RELATIONS.index(scene["relation"]))
        boxes = [[float(v) / side for v in obj["bbox"]] for obj in objects]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (codes, boxes) if len(objects) == 2 and all(len(b) == 4 for b in boxes) else None


def decode_scene(codes: list[int]) -> tuple[dict, dict, str]:
    """`(first, second, relation)` of `encode_scene` codes, as `scene_captions` takes them."""
    first, second = (
        {"shape": SHAPES[codes[i]], "colour": list(COLOURS)[codes[i + 1]], "size": list(SIZES)[codes[i + 2]]}
        for i in (0, 3)
    )
    return first, second, RELATIONS[codes[6]]


def _draw_layout(rng: np.random.Generator, image_size: int) -> tuple[list[dict], str]:
    """Chooses both objects and places them in opposite halves so the relation cannot be misread."""
    shapes = rng.choice(len(SHAPES), size=2, replace=False)  # distinct shapes: "the circle" names one object
    colours = list(COLOURS)
    objects = []
    for shape in shapes:
        size = "small" if rng.random() < 0.5 else "large"
        objects.append(
            {
                "shape": SHAPES[shape],
                "colour": colours[rng.integers(len(colours))],
                "size": size,
                "side": float(rng.uniform(*SIZES[size])),
            }
        )
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    # The first object goes in the half named by the relation; "along" is the axis the relation is about.
    first_low = relation in ("left", "above")
    halves = [(_MARGIN, 0.5 - _GAP / 2), (0.5 + _GAP / 2, 1 - _MARGIN)]
    along = []
    for obj, (lo, hi) in zip(objects, halves if first_low else halves[::-1]):
        along.append(rng.uniform(lo + obj["side"] / 2, hi - obj["side"] / 2))
    # Keep the centres' offset across the axis at most half their distance along it: clearly left, not above.
    limit = abs(along[0] - along[1]) / 2
    s0, s1 = objects[0]["side"], objects[1]["side"]
    across0 = rng.uniform(_MARGIN + s0 / 2, 1 - _MARGIN - s0 / 2)
    lo, hi = max(_MARGIN + s1 / 2, across0 - limit), min(1 - _MARGIN - s1 / 2, across0 + limit)
    across = [across0, rng.uniform(lo, hi)]
    for obj, a, c in zip(objects, along, across):
        x, y = (a, c) if relation in ("left", "right") else (c, a)
        obj["bbox"] = _pixel_box(x, y, obj.pop("side"), image_size)
    return objects, relation


def _pixel_box(x: float, y: float, side: float, image_size: int) -> list[int]:
    """Converts a centre and side in image fractions to a pixel box `[x0, y0, x1, y1]` (x1, y1 exclusive)."""
    n = max(1, round(side * image_size))
    x0, y0 = round(x * image_size - n / 2), round(y * image_size - n / 2)
    return [x0, y0, x0 + n, y0 + n]


def _draw_background(rng: np.random.Generator, image_size: int) -> tuple[dict, np.ndarray]:
    """Returns the background description and pixels (H, W, 3) uint8: a solid tone or a gradient, maybe noisy."""
    tones = np.asarray(_BACKGROUND_TONES, dtype=np.float32)
    first, second = rng.choice(len(tones), size=2, replace=False)
    kind = ("solid", "horizontal", "vertical", "diagonal")[rng.integers(4)]
    noisy = bool(rng.random() < 1 / 3)
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    t = {
        "solid": np.zeros((1, 1)),
        "horizontal": ramp[None, :],
        "vertical": ramp[:, None],
        "diagonal": (ramp[None, :] + ramp[:, None]) / 2,
    }[kind]
    pixels = tones[first] * (1 - t[..., None]) + tones[second] * t[..., None]  # (H, W, 3) or broadcastable
    pixels = np.broadcast_to(pixels, (image_size, image_size, 3))
    if noisy:
        pixels = pixels + rng.normal(0.0, _NOISE_STD, size=(image_size, image_size, 1)).astype(np.float32)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return {"kind": "solid" if kind == "solid" else f"{kind} gradient", "noise": noisy}, pixels


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: list[int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1  # ImageDraw boxes include their last pixel
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def ensure_synthetic_dataset(
    out_dir: str | os.PathLike, num_train: int, num_val: int, image_size: int = 64, seed: int = 0, shard_size: int = 500
) -> dict:
    """Writes the synthetic train/val shards and vocabulary, unless a complete identical dataset is there.

    The manifest `synthetic.json` is written last and removed first, so an interrupted run is redone by the
    next call. Call it from one process (Lightning's `prepare_data`), not from every rank.

    Args:
        out_dir: Folder for `train-*.tar`, `val-*.tar`, their indexes, `vocab.json` and the manifest.
        num_train: Training scenes (indices 0 .. num_train - 1).
        num_val: Validation scenes (indices VAL_INDEX_OFFSET + 0 .. num_val - 1).
        image_size: Image side in pixels.
        seed: Dataset seed.
        shard_size: Samples per shard.

    Returns:
        `{"train_shards", "val_shards"}` brace patterns, `"vocab"` path, `"num_train"`, `"num_val"`, and
        `"num_train_shards"`, `"num_val_shards"`, `"reused"` (True when nothing had to be written).
    """
    # Checked before anything is deleted, so a bad call cannot break a good dataset.
    if not 1 <= num_train <= VAL_INDEX_OFFSET or num_val < 1:
        raise ValueError(
            f"num_train must be in [1, {VAL_INDEX_OFFSET}] and num_val >= 1, "
            f"got num_train={num_train}, num_val={num_val}"
        )
    if image_size < 32 or seed < 0 or shard_size < 1:
        raise ValueError(
            f"image_size must be >= 32, seed >= 0 and shard_size >= 1, got {image_size}, {seed} and {shard_size}"
        )
    out_dir = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "shard_size": shard_size,
    }
    manifest = _read_manifest(out_dir)
    if manifest is not None and manifest["params"] == params and _files_intact(out_dir, manifest):
        log.info("reusing the synthetic dataset in %s", out_dir)
        return _describe(out_dir, manifest, reused=True)
    log.info("generating %d train + %d val synthetic scenes in %s", num_train, num_val, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    train_captions = _write_split(out_dir, "train", range(num_train), seed, image_size, shard_size)
    _write_split(out_dir, "val", range(VAL_INDEX_OFFSET, VAL_INDEX_OFFSET + num_val), seed, image_size, shard_size)
    Vocabulary.build(train_captions, min_count=1).save(out_dir / "vocab.json")
    manifest = _write_manifest(out_dir, params)
    return _describe(out_dir, manifest, reused=False)


def _write_split(out_dir: Path, split: str, indices: range, seed: int, image_size: int, shard_size: int) -> list[str]:
    """Writes the scenes `indices` as one split and returns all their captions."""
    all_captions = []
    with ShardWriter(out_dir, split, shard_size) as writer:
        for index in indices:
            image, captions, attributes = generate_scene(index, seed, image_size)
            # The key is the scene index itself: unique across splits and enough to redraw the scene. The scene's
            # attributes travel with it, so evaluation can check whether a caption is true (`scene_truth`).
            meta = {"image_id": index, "captions": captions, "scene": scene_record(attributes)}
            writer.write((f"{index:010d}", encode_jpeg(image, full_chroma=True), "jpg", meta))
            all_captions.extend(captions)
    return all_captions


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and {"params", "files", "splits"} <= manifest.keys() else None


def _files_intact(out_dir: Path, manifest: dict) -> bool:
    """True when no temporary file is left and every recorded file is there with its recorded size."""
    if any(out_dir.glob("*.tmp")):
        return False
    for name, size in manifest["files"].items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_manifest(out_dir: Path, params: dict) -> dict:
    splits = {split: json.loads(index_path(out_dir, split).read_text()) for split in ("train", "val")}
    names = ["vocab.json"] + [index_path(out_dir, s).name for s in splits]
    names += [shard["name"] for index in splits.values() for shard in index["shards"]]
    manifest = {"params": params, "splits": splits, "files": {n: (out_dir / n).stat().st_size for n in names}}
    path = out_dir / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return manifest


def _describe(out_dir: Path, manifest: dict, reused: bool) -> dict:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    return {
        "train_shards": shard_pattern(out_dir, "train", len(train["shards"])),
        "val_shards": shard_pattern(out_dir, "val", len(val["shards"])),
        "vocab": os.path.join(os.fspath(out_dir), "vocab.json"),
        "num_train": train["num_samples"],
        "num_val": val["num_samples"],
        "num_train_shards": len(train["shards"]),
        "num_val_shards": len(val["shards"]),
        "reused": reused,
    }
