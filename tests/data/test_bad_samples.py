"""Bad samples are skipped and counted, never fatal: planted in real tar shards and trained on by the `capline` CLI.

Every kind of bad sample is planted once (or a known number of times) in 64 training samples, so that one epoch of
8 batches of 8 reads each exactly once, with 1 or 2 dataloader workers; the per-reason counts logged to W&B must
then equal what was planted.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from capline.data.collate import CaptionBatcher, ImageTransform
from capline.data.decode import SKIP_REASONS, SkipCounter, SkipSample, decode_sample
from capline.data.layouts import LayoutReader
from capline.data.pipeline import EvalStream
from capline.data.synthetic import generate_scene
from capline.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wandb_records import read_run, run_files, series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64  # configs/demo.yaml's encoder img_size and data.synthetic.image_size
MAX_LEN = 16  # configs/demo.yaml's data.max_len
SHARD_SAMPLES = 16  # raw samples per training shard: 4 shards = 8 batches of 8, 2 shards per worker with 2 workers
BATCH = 8

# Every bad kind planted in the training shards, and the reason it must be counted under.
BAD_KINDS = {
    "undecodable-bytes": "corrupt_image",
    "truncated-jpeg": "corrupt_image",
    "no-caption-file": "other_layout",  # an image and a .txt, no .json: a sample of the txt layout
    "image-only": "missing_captions",
    "captions-only": "missing_image",
    "unparsable-json": "bad_json",
    "non-utf8-json": "bad_json",
    "json-nested-too-deep": "bad_json",  # made json.loads raise RecursionError, which stopped training
    "empty-captions": "empty_captions",
    "bomb-over-capline-limit": "image_too_large",  # 9000^2 = 81M pixels: over capline's 64M, under PIL's 89M
    "bomb-over-pil-warning": "image_too_large",  # 10000^2 = 100M: PIL only warns, capline makes it an error
    "bomb-over-pil-error": "image_too_large",  # 30000^2 = 900M: over 2x PIL's limit, PIL raises at open
}
# Odd but usable samples: converted, never skipped.
USABLE_KINDS = (
    "cmyk-jpeg",
    "gray16-png",
    "rgb16-png",
    "palette-png",
    "rgba-png",
    "long-caption",  # 16,000 words: truncated to MAX_LEN
    "huge-image-id",  # 2**70 does not fit the int64 id tensor of a batch: it stopped training
    "infinite-image-id",  # JSON's Infinity: int() raises OverflowError, which stopped training
)
# What the planted training shards must count: the bad kinds and one shard cut in the middle of a member.
EXPECTED = Counter(BAD_KINDS.values()) + Counter({"broken_shard": 1})
VAL_BAD_KINDS = ("undecodable-bytes", "unparsable-json", "image-only", "bomb-over-pil-error")
VAL_GOOD = 12


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what PIL cannot write: 16-bit RGB, or a header claiming any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def rgb16_png(image: Image.Image) -> bytes:
    pixels = np.asarray(image, dtype=np.uint16) * 257  # (H, W, 3), 8-bit values spread over 16 bits
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0, big-endian samples
    return png(image.width, image.height, 16, 2, rows)


def rgba_png(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    alpha = np.full((image.height, image.width), 255, dtype=np.uint8)
    alpha[:8, :8] = 0  # a transparent corner, composited on white
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


def sample_members(kind: str, key: str, index: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample of `kind` ("good" or a planted kind), built from synthetic scene `index`."""
    image, captions, _ = generate_scene(index, image_size=IMAGE_SIZE)
    jpg = encode(image, "JPEG")
    meta = {"image_id": index, "captions": captions}
    special_images = {
        "undecodable-bytes": ("jpg", bytes(range(256)) * 8),
        "truncated-jpeg": ("jpg", jpg[: len(jpg) // 2]),
        "bomb-over-capline-limit": ("png", png(9000, 9000, 8, 2, b"")),
        "bomb-over-pil-warning": ("png", png(10000, 10000, 8, 2, b"")),
        "bomb-over-pil-error": ("png", png(30000, 30000, 8, 2, b"")),
        "cmyk-jpeg": ("jpg", encode(image.convert("CMYK"), "JPEG")),
        "gray16-png": ("png", encode(Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257), "PNG")),
        "rgb16-png": ("png", rgb16_png(image)),
        "palette-png": ("png", encode(image.quantize(64), "PNG")),
        "rgba-png": ("png", rgba_png(image)),
    }
    special_metas = {
        "unparsable-json": b'{"image_id": 1, "captions": ["a red',
        "non-utf8-json": json.dumps(meta, ensure_ascii=False).replace("}", ', "note": "caf\xe9"}').encode("latin-1"),
        "json-nested-too-deep": b'{"captions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "empty-captions": json.dumps({"image_id": index, "captions": ["", "   "]}).encode(),
        "long-caption": json.dumps({"image_id": index, "captions": [" ".join([captions[0]] * 2000)]}).encode(),
        "huge-image-id": json.dumps({"image_id": 2**70, "captions": captions}).encode(),
        "infinite-image-id": json.dumps({"image_id": float("inf"), "captions": captions}).encode(),
    }
    ext, image_bytes = special_images.get(kind, ("jpg", jpg))
    image_member = (f"{key}.{ext}", image_bytes)
    meta_member = (f"{key}.json", special_metas.get(kind, json.dumps(meta).encode()))
    if kind == "image-only":
        return [image_member]
    if kind == "no-caption-file":
        return [image_member, (f"{key}.txt", captions[0].encode())]
    if kind == "captions-only":
        return [meta_member]
    return [image_member, meta_member]


def write_tar(path: Path, members: list[tuple[str, bytes]], encoding: str = "utf-8") -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cut_in_member(path: Path, member: str) -> None:
    """Truncates a tar in the middle of `member`'s data, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])


def kind_of(key: str) -> str:
    return key.split("-", 1)[1]  # keys are "<split><index>-<kind>"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """4 training shards of 16 raw samples (the last one cut short) with every kind planted, 1 validation shard."""
    root = tmp_path_factory.mktemp("planted")
    kinds = list(BAD_KINDS) + list(USABLE_KINDS)
    kinds += ["good"] * (4 * SHARD_SAMPLES - len(kinds))
    random.Random(0).shuffle(kinds)
    samples = [(f"t{i:03d}-{kind}", kind, i) for i, kind in enumerate(kinds)]
    for shard in range(4):
        chunk = samples[shard * SHARD_SAMPLES : (shard + 1) * SHARD_SAMPLES]
        if shard == 3:  # read up to the cut only: the samples after it are lost
            chunk += [(f"t{i:03d}-lost", "good", i) for i in range(100, 104)]
        members = [m for key, kind, i in chunk for m in sample_members(kind, key, i)]
        write_tar(root / f"train-{shard:06d}.tar", members)
    cut_in_member(root / "train-000003.tar", "t100-lost.jpg")

    val_kinds = list(VAL_BAD_KINDS) + ["good"] * VAL_GOOD
    random.Random(1).shuffle(val_kinds)
    val = [m for i, kind in enumerate(val_kinds) for m in sample_members(kind, f"v{i:03d}-{kind}", 1000 + i)]
    write_tar(root / "val-000000.tar", val)

    captions = [c for i in range(len(kinds)) for c in generate_scene(i, image_size=IMAGE_SIZE)[1]]
    Vocabulary.build(captions, min_count=1).save(root / "vocab.json")
    return {
        "root": root,
        "train": [str(root / f"train-{s:06d}.tar") for s in range(4)],
        "val": [str(root / "val-000000.tar")],
        "vocab": str(root / "vocab.json"),
    }


def read_raw(urls: list[str]) -> list[dict]:
    return list(wds.tariterators.tarfile_samples(({"url": u} for u in urls), handler=lambda exn: True))


# ---- in-process: each planted kind, decoded as the training stream does -------------------------------------
def test_every_planted_kind_is_read_once_and_decodes_to_its_reason(planted):
    raw = read_raw(planted["train"])
    kinds = [kind_of(r["__key__"]) for r in raw]
    assert len(raw) == len({r["__key__"] for r in raw}) == 4 * SHARD_SAMPLES  # each sample once
    assert "lost" not in kinds  # nothing after the cut
    reasons = {}
    for sample in raw:
        try:
            decoded = decode_sample(sample, None, LayoutReader("capline"))  # as the stream reads capline shards
            assert decoded.image.mode == "RGB" and decoded.captions
        except SkipSample as skip:
            reasons[kind_of(sample["__key__"])] = skip.reason
    assert reasons == BAD_KINDS


def test_odd_usable_samples_are_converted_and_long_captions_truncated(planted):
    raw = [r for r in read_raw(planted["train"]) if kind_of(r["__key__"]) in USABLE_KINDS]
    transform = ImageTransform({"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "crop_pct": 1.0})
    batcher = CaptionBatcher(Vocabulary.load(planted["vocab"]), transform, MAX_LEN, max_refs=5, train=True)
    batch = batcher(raw, SkipCounter(), epoch=0)
    assert batch["skipped"].sum() == 0 and batch["images"].shape == (len(USABLE_KINDS), 3, IMAGE_SIZE, IMAGE_SIZE)
    rows = {kind_of(k): i for i, k in enumerate(batch["keys"])}
    for kind in ("cmyk-jpeg", "gray16-png", "rgb16-png", "palette-png", "rgba-png"):
        index = int(batch["keys"][rows[kind]][1:4])
        scene = np.asarray(generate_scene(index, image_size=IMAGE_SIZE)[0], dtype=np.float32)
        if kind == "gray16-png":
            scene = np.asarray(generate_scene(index, image_size=IMAGE_SIZE)[0].convert("L"), np.float32)[..., None]
        image = batch["images"][rows[kind]].permute(1, 2, 0).float().numpy()
        if kind == "rgba-png":
            assert (image[:8, :8] == 255).all()  # the transparent corner is composited on white
            image, scene = image[8:], scene[8:]
        assert np.abs(image - scene).mean() < (8 if kind == "cmyk-jpeg" else 1), kind  # the scene, less JPEG loss
    long_row = batch["tokens"][rows["long-caption"]]
    assert batch["tokens"].shape[1] == MAX_LEN + 2 and long_row[-1] == Vocabulary.end_id and long_row.ne(0).all()
    huge, infinite = (batch["image_ids"][rows[k]].item() for k in ("huge-image-id", "infinite-image-id"))
    assert huge != infinite and 0 <= huge < 2**31 and 0 <= infinite < 2**31  # stable hashed ids


@pytest.mark.parametrize(
    "pil_limit,side,reason",
    [
        (89_478_485, 8_000, "corrupt_image"),  # 64M pixels: at capline's limit, decoded (and found truncated)
        (89_478_485, 9_000, "image_too_large"),  # capline's own check
        (89_478_485, 10_000, "image_too_large"),  # PIL's warning, made an error
        (89_478_485, 30_000, "image_too_large"),  # PIL's error
        (None, 20_000, "image_too_large"),  # a library switched PIL's check off: capline's still holds
        (1_000_000, 1_000, "corrupt_image"),  # a lower PIL limit wins: at it, decoded
        (1_000_000, 1_200, "image_too_large"),  # over it, PIL's warning
        (1_000_000, 3_000, "image_too_large"),  # over twice it, PIL's error
    ],
)
def test_the_pixel_limit_is_the_lower_of_capline_and_pil(monkeypatch, pil_limit, side, reason):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    meta = json.dumps({"image_id": 1, "captions": ["a red circle"]}).encode()
    with pytest.raises(SkipSample) as skip:
        decode_sample({"__key__": "k", "png": png(side, side, 8, 2, b""), "json": meta})
    assert skip.value.reason == reason


def test_a_thin_strip_is_cropped_before_it_is_resized(monkeypatch):
    resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 224 * 224, size  # enlarging 1 x 20,000 whole made 256 x 5,120,000 (5 GB, 24 s)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    transform = ImageTransform({"input_size": (3, 224, 224), "crop_pct": 0.875})
    out = transform(Image.new("RGB", (1, 20_000), (200, 10, 10)))
    assert out.shape == (3, 224, 224) and out[:, 112, 112].tolist() == [200, 10, 10]


def test_a_sample_whose_member_names_are_not_utf8_is_trained_on(tmp_path):
    write_tar(tmp_path / "latin-1.tar", sample_members("good", "caf\xe9", 0), encoding="latin-1")
    raw = read_raw([str(tmp_path / "latin-1.tar")])
    vocab = Vocabulary.build(generate_scene(0, image_size=IMAGE_SIZE)[1], min_count=1)
    transform = ImageTransform({"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "crop_pct": 1.0})
    batch = CaptionBatcher(vocab, transform, MAX_LEN, max_refs=5, train=True)(raw, SkipCounter(), epoch=0)
    assert batch["keys"] == ["caf\udce9"] and batch["skipped"].sum() == 0


# ---- the stream: a shard cut in the middle of a member ---------------------------------------------------------
def keys_and_counts(raw_samples: list[dict], counter: SkipCounter, epoch: int) -> dict:
    return {"keys": [r["__key__"] for r in raw_samples], "skipped": counter.take()}


def read_stream(urls: list[str]) -> tuple[list[str], torch.Tensor]:
    batches = list(EvalStream(urls, keys_and_counts, batch_size=BATCH))
    return [k for b in batches for k in b["keys"]], sum(b["skipped"] for b in batches)


def test_the_stream_goes_on_after_a_shard_cut_in_the_middle_of_a_member(planted):
    keys, _ = read_stream([planted["train"][3], planted["train"][0]])
    assert len(keys) == 2 * SHARD_SAMPLES and len(set(keys)) == len(keys)
    assert keys[SHARD_SAMPLES:] == [r["__key__"] for r in read_raw([planted["train"][0]])]


def test_a_shard_cut_in_the_middle_of_a_member_counts_one_broken_shard(planted):
    _, skipped = read_stream([planted["train"][3], planted["train"][0]])
    assert skipped[SKIP_REASONS.index("broken_shard")] == 1


# ---- end to end: the real CLI trains one epoch over the planted shards --------------------------------------
@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def fit(request, planted) -> dict:
    run_dir = planted["root"] / f"run-{request.param}-workers"
    home = run_dir / "wandb-home"
    home.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update({var: str(home) for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")})
    args = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", str(planted["root"] / "train-{000000..000003}.tar"),
        "--data.val_shards", planted["val"][0],
        "--data.vocab", planted["vocab"],
        "--data.samples_per_epoch", str(4 * SHARD_SAMPLES),  # one epoch reads every raw sample exactly once
        "--data.global_batch_size", str(BATCH),
        "--data.num_workers", str(request.param),
        "--trainer.max_steps", str(4 * SHARD_SAMPLES // BATCH),
        "--trainer.val_check_interval", str(4 * SHARD_SAMPLES // BATCH),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "capline", "fit", *args],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = run_files(run_dir)
    assert len(files) == 1
    return {"result": result, "run": read_run(files[0])}


@pytest.mark.slow
def test_fit_counts_every_bad_kind_the_decoder_skips(fit):
    for reason in SKIP_REASONS:
        if reason != "broken_shard":
            assert series(fit["run"], f"data/skipped/{reason}") == [EXPECTED[reason]], reason


@pytest.mark.slow
def test_fit_counts_the_cut_shard_once_and_every_skip_in_the_total(fit):
    assert series(fit["run"], "data/skipped/broken_shard") == [1]
    assert series(fit["run"], "data/skipped") == [sum(EXPECTED.values())]


@pytest.mark.slow
def test_fit_warns_once_per_reason_not_per_sample(fit):
    stderr = fit["result"].stderr
    warned = Counter(re.findall(r"skipping bad samples: (\w+)", stderr))
    assert warned == Counter(dict.fromkeys(EXPECTED, 1))
    assert not [kind for kind in BAD_KINDS if kind in stderr]  # no line names a sample
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_fit_validates_every_good_validation_image_once(fit):
    assert series(fit["run"], "val/num_images") == [VAL_GOOD]
