"""Fuzzing the decoder: corrupted image or caption bytes either decode to an RGB image with captions or become a
`SkipSample` with a known reason, in `decode_sample` and in `CaptionBatcher`; never another exception, never a hang.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from capline.data.collate import CaptionBatcher, ImageTransform
from capline.data.decode import SKIP_REASONS, SkipCounter, SkipSample, decode_sample
from capline.data.synthetic import generate_scene
from capline.vocab import Vocabulary

SCENE, CAPTIONS, _ = generate_scene(0, image_size=48)
META = json.dumps({"image_id": 7, "captions": CAPTIONS}).encode()
TRANSFORM = ImageTransform({"input_size": (3, 32, 32), "crop_pct": 0.875})
VOCAB = Vocabulary.build(CAPTIONS, min_count=1)
EXAMPLE_TIMEOUT_S = 10  # far above any single decode here: only a hang reaches it
FUZZ = settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# Real image files in the formats and modes shards hold: (tar member extension, bytes).
IMAGES = {
    "jpeg": ("jpg", encode(SCENE, "JPEG")),
    "progressive-jpeg": ("jpg", encode(SCENE, "JPEG", progressive=True)),
    "cmyk-jpeg": ("jpg", encode(SCENE.convert("CMYK"), "JPEG")),
    "gray-jpeg": ("jpg", encode(SCENE.convert("L"), "JPEG")),
    "png": ("png", encode(SCENE, "PNG")),
    "palette-png": ("png", encode(SCENE.quantize(16), "PNG")),
    "rgba-png": ("png", encode(SCENE.convert("RGBA"), "PNG")),
    "gray16-png": ("png", encode(Image.fromarray(np.asarray(SCENE.convert("L"), np.uint16) * 257), "PNG")),
}
# Structure bytes spliced in, like a fuzzer's dictionary: markers, chunk names, JSON syntax and number edge cases.
IMAGE_TOKENS = [b"\xff\xd8", b"\xff\xd9", b"\xff\xc0", b"\xff\xc4", b"\xff\xda", b"IHDR", b"IDAT", b"PLTE", b"IEND"]
JSON_TOKENS = [b"[", b"{", b'"', b"\\", b"\\ud800", b"Infinity", b"-", b"9" * 30, b"1e999", b"null", b"\xff", b"\xc3"]


@st.composite
def corrupted(draw, data: bytes, tokens: list[bytes]) -> bytes:
    """`data` after 1 to 4 bit flips, truncations, zeroed ranges, or insertions or overwrites of random bytes or
    tokens (repeated up to thousands of times)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "zero", "insert", "overwrite"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "zero":
            end = pos + draw(st.integers(1, 64))
            buf[pos:end] = bytes(len(buf[pos:end]))
        else:
            piece = draw(st.one_of(st.sampled_from(tokens), st.binary(min_size=1, max_size=16)))
            piece *= draw(st.sampled_from([1, 1, 2, 5000]))
            buf[pos : pos + (len(piece) if op == "overwrite" else 0)] = piece
    return bytes(buf)


def fix_png_crcs(data: bytes) -> bytes:
    """Recomputes every chunk checksum, so that a corruption reaches PIL's PNG decoder and not only its CRC check."""
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        end = pos + 8 + struct.unpack(">I", data[pos : pos + 4])[0]
        if end + 4 > len(data):
            break
        out += data[pos:end] + struct.pack(">I", zlib.crc32(data[pos + 4 : end]))
        pos = end + 4
    return bytes(out + data[pos:])


@st.composite
def corrupted_images(draw) -> tuple[str, bytes]:
    ext, data = IMAGES[draw(st.sampled_from(sorted(IMAGES)))]
    data = draw(corrupted(data, IMAGE_TOKENS))
    if ext == "png" and draw(st.booleans()):
        data = fix_png_crcs(data)
    return ext, data


@contextmanager
def no_hang(seconds: float):
    def fail(signum, frame):
        raise TimeoutError(f"decoding took over {seconds} s")

    handler = signal.signal(signal.SIGALRM, fail)
    timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:  # pytest-timeout's alarm, when it set one, is put back
        signal.setitimer(signal.ITIMER_REAL, *timer)
        signal.signal(signal.SIGALRM, handler)


def decodes_or_skips(raw: dict) -> bool:
    """Checks the contract on one sample; returns whether it decoded."""
    with no_hang(EXAMPLE_TIMEOUT_S):
        try:
            sample = decode_sample(raw, draft_size=TRANSFORM.resize_to)
        except SkipSample as skip:
            assert skip.reason in SKIP_REASONS
            return False
    assert sample.image.mode == "RGB" and sample.image.width > 0 and sample.image.height > 0
    assert sample.captions and all(c.strip() for c in sample.captions)
    assert -(2**63) <= sample.image_id < 2**63
    return True


@FUZZ
@given(image=corrupted_images())
def test_corrupted_images_decode_or_skip(image):
    ext, data = image
    decodes_or_skips({"__key__": "k", ext: data, "json": META})


@FUZZ
@given(meta=corrupted(META, JSON_TOKENS))
@example(meta=b'{"captions": ' + b"[" * 5000 + b"]" * 5000 + b"}")  # json.loads raised RecursionError
@example(meta=b'{"image_id": ' + b"9" * 5000 + b', "captions": ["a"]}')  # ValueError: over 4300 digits
@example(meta=b'{"image_id": Infinity, "captions": ["a red circle"]}')  # int() raised OverflowError
@example(meta=b'{"image_id": 1e999, "captions": ["a red circle"]}')  # the same, written as a float
@example(meta=b'{"image_id": "\\ud800", "captions": ["a red circle"]}')  # str.encode() raised on the lone surrogate
def test_corrupted_caption_json_decodes_or_skips(meta):
    decodes_or_skips({"__key__": "k", "jpg": IMAGES["jpeg"][1], "json": meta})


@settings(FUZZ, max_examples=200)
@given(image=corrupted_images(), meta=corrupted(META, JSON_TOKENS), train=st.booleans())
@example(image=IMAGES["png"], meta=b'{"image_id": 99999999999999999999999, "captions": ["a"]}', train=True)
def test_batches_of_corrupted_samples_hold_every_good_sample_and_count_every_bad_one(image, meta, train):
    ext, data = image
    raw = [
        {"__key__": "image", ext: data, "json": META},
        {"__key__": "meta", "jpg": IMAGES["jpeg"][1], "json": meta},
        {"__key__": "good", "png": IMAGES["png"][1], "json": META},
    ]
    expected = [r["__key__"] for r in raw if decodes_or_skips(r)]
    batcher = CaptionBatcher(VOCAB, TRANSFORM, max_len=8, max_refs=3, train=train)
    with no_hang(EXAMPLE_TIMEOUT_S):
        batch = batcher(raw, SkipCounter(), epoch=0)
    n = len(expected)
    assert batch["keys"] == expected and int(batch["skipped"].sum()) == len(raw) - n
    assert batch["images"].shape == (n, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["tokens"].shape[0] == n and (batch["tokens"][:, 0] == Vocabulary.start_id).all()
    assert batch["image_ids"].shape == (n,)
    if not train:
        assert batch["refs"].shape == (n, 3, 8) and len(batch["captions"]) == n


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_uncorrupted_base_image_decodes(name):
    ext, data = IMAGES[name]
    assert decodes_or_skips({"__key__": "k", ext: data, "json": META})
