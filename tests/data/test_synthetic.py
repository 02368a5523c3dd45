"""Synthetic scenes: determinism, captions true of the image, geometry, and the idempotent dataset writer."""

import io
import itertools
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from capline.data.shards import encode_jpeg, read_index
from capline.data.synthetic import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    VAL_INDEX_OFFSET,
    _draw_shape,
    ensure_synthetic_dataset,
    generate_scene,
    scene_captions,
)
from capline.vocab import Vocabulary, tokenize

_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _scenes(n: int, image_size: int = 64, seed: int = 0):
    return [generate_scene(i, seed, image_size) for i in range(n)]


def test_scene_is_deterministic_per_index_and_seed():
    first = [(encode_jpeg(img), caps, attrs) for img, caps, attrs in _scenes(20)]
    again = [(encode_jpeg(img), caps, attrs) for img, caps, attrs in reversed(_scenes(20))][::-1]
    assert first == again
    other_seed = [generate_scene(i, seed=1)[1] for i in range(20)]
    assert sum(a[1] != b for a, b in zip(first, other_seed)) >= 15


def test_captions_follow_the_attributes():
    for _, captions, attrs in _scenes(300):
        a, b = attrs["objects"]
        rel = attrs["relation"]
        a_full, b_full = f"{a['size']} {a['colour']} {a['shape']}", f"{b['size']} {b['colour']} {b['shape']}"
        assert len(captions) == 5 and len(set(captions)) == 5
        assert captions[0] == f"a {a_full} {_PHRASE[rel]} a {b_full}"
        # The flipped caption names the second object first, with the inverse relation.
        assert captions[1] == f"a {b_full} is {_PHRASE[_INVERSE[rel]]} a {a_full}"
        assert f"{a['colour']} {a['shape']}" in captions[2] and rel in captions[2].split()
        assert f"with the {a['shape']}" in captions[3]
        assert captions[4].startswith(f"a {b_full} with a {a_full}")
        for caption in captions:
            words = set(tokenize(caption))
            assert {a["colour"], a["shape"], b["colour"], b["shape"], a["size"], b["size"]} <= words
            # No caption may name an attribute the image does not show.
            assert words & set(COLOURS) == {a["colour"], b["colour"]}
            assert words & set(SHAPES) == {a["shape"], b["shape"]}


def test_side_and_relation_words_of_every_caption():
    first, second = (
        {"shape": "circle", "colour": "red", "size": "small"},
        {"shape": "square", "colour": "blue", "size": "large"},
    )
    assert scene_captions(first, second, "left") == [
        "a small red circle to the left of a large blue square",
        "a large blue square is to the right of a small red circle",
        "there is a small red circle left of a large blue square",
        "a small red circle and a large blue square side by side with the circle on the left",
        "a large blue square with a small red circle to its left",
    ]
    assert scene_captions(first, second, "below")[3].endswith("one above the other with the circle at the bottom")


def test_attributes_are_all_used():
    attrs = [s[2] for s in _scenes(400)]
    objects = [o for a in attrs for o in a["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {a["relation"] for a in attrs} == set(RELATIONS)
    assert len({a["background"]["kind"] for a in attrs}) == 4
    assert all(a["objects"][0]["shape"] != a["objects"][1]["shape"] for a in attrs)


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_objects_are_apart_and_the_relation_is_geometrically_true(image_size):
    for image, _, attrs in _scenes(300, image_size):
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["bbox"] for o in attrs["objects"])
        assert min(ax0, ay0, bx0, by0) >= 0 and max(ax1, ay1, bx1, by1) <= image_size
        a_centre, b_centre = np.array([ax0 + ax1, ay0 + ay1]) / 2, np.array([bx0 + bx1, by0 + by1]) / 2
        gap = {"left": bx0 - ax1, "right": ax0 - bx1, "above": by0 - ay1, "below": ay0 - by1}[attrs["relation"]]
        assert gap >= 1  # boxes are separated along the relation's axis, so they cannot overlap either
        along = 0 if attrs["relation"] in ("left", "right") else 1
        offset = abs(a_centre - b_centre)
        assert offset[1 - along] <= offset[along] / 2 + 1  # +1: rounding to pixels


def test_sizes_are_clearly_different():
    sides = {"small": [], "large": []}
    for _, _, attrs in _scenes(300):
        for obj in attrs["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert x1 - x0 == y1 - y0
            sides[obj["size"]].append(x1 - x0)
    assert max(sides["small"]) <= 14 and min(sides["large"]) >= 21  # pixels at 64 px


def test_decoded_image_shows_the_object_colours_on_a_dark_background():
    for image, _, attrs in _scenes(200):
        pixels = np.asarray(Image.open(io.BytesIO(encode_jpeg(image, full_chroma=True))), dtype=int)
        for obj in attrs["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            # Below the box centre lies inside every shape (the triangle's apex is at the top).
            inside = pixels[(y0 + y1) // 2 + (y1 - y0) // 6, (x0 + x1) // 2]
            assert np.abs(inside - COLOURS[obj["colour"]]).max() <= 40
        corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.max() <= 100
        distance = np.abs(corners[:, None, :] - np.array(list(COLOURS.values()))[None]).max(axis=2)
        assert distance.min() >= 100


def test_shapes_differ_in_many_pixels_at_the_small_size():
    masks = {}
    for shape in SHAPES:
        canvas = Image.new("L", (11, 11))
        _draw_shape(ImageDraw.Draw(canvas), shape, [0, 0, 11, 11], 255)
        masks[shape] = np.asarray(canvas) > 0
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] ^ masks[b]).sum() >= 0.15 * 121, (a, b)


def test_vocabulary_of_every_attribute_combination_is_small():
    captions = [
        c
        for s1, s2 in itertools.permutations(SHAPES, 2)
        for c1, c2, z1, z2 in itertools.product(COLOURS, COLOURS, SIZES, SIZES)
        for rel in RELATIONS
        for c in scene_captions({"shape": s1, "colour": c1, "size": z1}, {"shape": s2, "colour": c2, "size": z2}, rel)
    ]
    words = len(Vocabulary.build(captions, min_count=1)) - 4
    assert words == 34 and words < 60


def _all_files(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_dataset_is_written_as_readable_shards(tmp_path):
    out = tmp_path / "syn"
    info = ensure_synthetic_dataset(out, num_train=50, num_val=25, shard_size=20)

    assert info == {
        "train_shards": f"{out}/train-{{000000..000002}}.tar",
        "val_shards": f"{out}/val-{{000000..000001}}.tar",
        "vocab": f"{out}/vocab.json",
        "num_train": 50,
        "num_val": 25,
        "num_train_shards": 3,
        "num_val_shards": 2,
        "reused": False,
    }
    assert [s["num_samples"] for s in read_index(out / "train-index.json")["shards"]] == [20, 20, 10]
    assert [s["num_samples"] for s in read_index(out / "val-index.json")["shards"]] == [20, 5]
    vocab = Vocabulary.load(info["vocab"])
    train = list(wds.WebDataset(info["train_shards"], shardshuffle=False).decode("pil"))
    val = list(wds.WebDataset(info["val_shards"], shardshuffle=False).decode("pil"))
    assert [s["json"]["image_id"] for s in train] == list(range(50))
    assert [s["json"]["image_id"] for s in val] == list(range(VAL_INDEX_OFFSET, VAL_INDEX_OFFSET + 25))
    for sample in train[:5] + val[:5]:
        assert sample["jpg"].size == (64, 64) and sample["jpg"].mode == "RGB"
        assert sample["json"]["captions"] == generate_scene(sample["json"]["image_id"])[1]
    assert all(vocab.unk_id not in vocab.encode(c) for s in train for c in s["json"]["captions"])


def test_second_call_reuses_the_dataset_without_writing(tmp_path):
    out = tmp_path / "syn"
    first = ensure_synthetic_dataset(out, num_train=30, num_val=10, shard_size=20)
    before = _all_files(out)
    second = ensure_synthetic_dataset(out, num_train=30, num_val=10, shard_size=20)
    assert second == {**first, "reused": True}
    assert _all_files(out) == before


@pytest.mark.parametrize("damage", ["leftover_tmp", "missing_manifest", "truncated_shard", "other_params"])
def test_incomplete_or_different_dataset_is_regenerated(tmp_path, damage):
    out = tmp_path / "syn"
    ensure_synthetic_dataset(out, num_train=30, num_val=10, shard_size=20)
    original = (out / "train-000000.tar").read_bytes()
    num_train = 30
    if damage == "leftover_tmp":
        (out / "train-000001.tar.tmp").write_bytes(b"half a shard")
    elif damage == "missing_manifest":
        (out / "synthetic.json").unlink()
    elif damage == "truncated_shard":
        (out / "train-000001.tar").write_bytes(b"")
    else:
        num_train = 15

    info = ensure_synthetic_dataset(out, num_train=num_train, num_val=10, shard_size=20)

    assert info["reused"] is False
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "synthetic.json").read_text())["params"]["num_train"] == num_train
    expected = ["train-000000.tar"] if num_train == 15 else ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in out.glob("train-*.tar")) == expected
    if num_train == 30:
        # Fixed member mtimes: regenerating gives byte-identical shards.
        assert (out / "train-000000.tar").read_bytes() == original
    assert ensure_synthetic_dataset(out, num_train=num_train, num_val=10, shard_size=20)["reused"] is True


def test_bad_arguments_are_rejected_before_touching_a_good_dataset(tmp_path):
    out = tmp_path / "syn"
    ensure_synthetic_dataset(out, num_train=10, num_val=5)
    before = _all_files(out)
    with pytest.raises(ValueError, match="num_val"):
        ensure_synthetic_dataset(out, num_train=10, num_val=0)
    with pytest.raises(ValueError, match="image_size"):
        ensure_synthetic_dataset(out, num_train=10, num_val=5, image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(0, image_size=16)
    assert _all_files(out) == before
