"""Sample decoding: every kind of bad sample becomes a counted skip reason, odd image modes become RGB."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from capline.data.collate import CaptionBatcher, ImageTransform, reference_ids
from capline.data.decode import SKIP_REASONS, SkipCounter, SkipSample, decode_sample
from capline.vocab import Vocabulary


def image_bytes(mode="RGB", size=(40, 30), fmt="JPEG") -> bytes:
    img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def meta(captions=("a red circle",), image_id=7) -> bytes:
    return json.dumps({"image_id": image_id, "captions": list(captions)}).encode()


def raw(**members) -> dict:
    return {"__key__": "k1", **members}


def test_good_sample_decodes_to_rgb_with_captions():
    sample = decode_sample(raw(jpg=image_bytes(), json=meta(["a red circle", "  ", "a circle"])))
    assert sample.image.mode == "RGB" and sample.image.size == (40, 30)
    assert sample.captions == ["a red circle", "a circle"] and sample.image_id == 7


@pytest.mark.parametrize(
    "members,reason",
    [
        ({"jpg": b"not a jpeg", "json": meta()}, "corrupt_image"),
        ({"jpg": image_bytes()[:200], "json": meta()}, "corrupt_image"),  # truncated
        ({"json": meta()}, "missing_image"),
        ({"jpg": image_bytes()}, "missing_captions"),
        ({"jpg": image_bytes(), "json": b"{not json"}, "bad_json"),
        ({"jpg": image_bytes(), "json": b"\xff\xfe\x00bad"}, "bad_json"),
        ({"jpg": image_bytes(), "json": b'{"captions": "one"}'}, "bad_json"),
        ({"jpg": image_bytes(), "json": meta(["", "   "])}, "empty_captions"),
    ],
)
def test_bad_samples_raise_skip_with_reason(members, reason):
    assert reason in SKIP_REASONS
    with pytest.raises(SkipSample) as info:
        decode_sample(raw(**members))
    assert info.value.reason == reason


def test_decompression_bomb_is_refused(monkeypatch):
    import capline.data.decode as decode

    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SkipSample) as info:
        decode_sample(raw(png=image_bytes(size=(50, 50), fmt="PNG"), json=meta()))
    assert info.value.reason == "image_too_large"


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_odd_modes_become_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    sample = decode_sample(raw(**{("jpg" if fmt == "JPEG" else "png"): image_bytes(mode, fmt=fmt), "json": meta()}))
    assert sample.image.mode == "RGB"


def test_transform_resizes_short_side_and_centre_crops_to_uint8():
    transform = ImageTransform({"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"})
    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (50, 1)).repeat(3).reshape(50, 100, 3))
    out = transform(img)
    assert out.shape == (3, 32, 32) and out.dtype.is_floating_point is False
    # the centre crop keeps the middle of the horizontal ramp
    assert 40 <= int(out[0, 16, 16]) <= 60


def test_batcher_pads_counts_skips_and_truncates_long_captions():
    vocab = Vocabulary.build(["a red circle left of a blue square"], min_count=1)
    transform = ImageTransform({"input_size": (3, 16, 16), "crop_pct": 1.0, "interpolation": "bilinear"})
    batcher = CaptionBatcher(vocab, transform, max_len=4, max_refs=2, train=False)
    long = "a red circle left of a blue square " * 20
    samples = [
        {"__key__": "a", "jpg": image_bytes(), "json": meta(["a red circle", long, "a zebra"], 1)},
        {"__key__": "b", "jpg": b"junk", "json": meta(image_id=2)},
        {"__key__": "c", "jpg": image_bytes(), "json": meta(["a blue square left of a red circle"], 3)},
    ]
    counter = SkipCounter()
    batch = batcher(samples, counter, epoch=0)
    assert batch["images"].shape == (2, 3, 16, 16)
    assert batch["image_ids"].tolist() == [1, 3]
    assert batch["skipped"][SKIP_REASONS.index("corrupt_image")] == 1 and batch["skipped"].sum() == 1
    assert batch["tokens"].shape == (2, 6)  # <start> + 4 words + <end>
    assert batch["tokens"][0].tolist() == vocab.encode("a red circle") + [0]
    assert batch["refs"].shape == (2, 2, 4)  # max_refs, max_len
    assert batch["refs"][1, 1].sum() == 0  # the second image has one reference only
    assert counter.take().sum() == 0  # counts are handed over once


def test_out_of_vocabulary_reference_words_get_distinct_ids_beyond_the_vocabulary():
    vocab = Vocabulary.build(["a red circle"], min_count=1)
    ids = reference_ids("a zebra and a giraffe", vocab, 10)
    assert ids[0] == vocab.index["a"] and ids[3] == ids[0]
    assert ids[1] >= len(vocab) and ids[4] >= len(vocab) and ids[1] != ids[4]
