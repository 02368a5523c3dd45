"""`capline caption` and `capline.inference` on checkpoints trained by the real `capline fit`, and on image files
of every kind a user may have: RGB, grayscale, CMYK, palette, alpha, 16-bit, large, non-square and truncated."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capline.checkpoints import CheckpointError
from capline.data.collate import ImageTransform
from capline.data.decode import open_image
from capline.inference import Captioner, find_images, load_caption_module

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "capline", "caption"]  # the `capline` entry point, as `python -m`

pytestmark = pytest.mark.slow  # the fixtures train two tiny models through the real CLI (about a minute)


def load_script():
    return importlib.import_module("capline.commands.caption")


def caption(*args) -> int:
    """The tool's `main`, in this process, on the CPU (the captions are compared with CPU references)."""
    return load_script().main(["--device", "cpu", *map(str, args)])


# ---- fixtures: two tiny checkpoints and a folder of awkward images -------------------------------------------
def _fit(tmp: Path, data: Path, name: str, *overrides: str) -> Path:
    run = tmp / name
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp / "wandb-home")}
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp / "wandb-home")
    result = subprocess.run(
        [sys.executable, "-m", "capline", "fit", "--config", str(ROOT / "configs/demo.yaml"),
         "--data.synthetic.root", str(data), "--data.synthetic.num_train", "320", "--data.synthetic.num_val", "48",
         "--data.global_batch_size", "16", "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
         "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run), *overrides],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("caption")
    data = tmp / "data"
    attention_decoder = [
        "--model.decoder.class_path", "capline.models.AttentionDecoder",
        "--model.decoder.init_args.embed_dim", "64", "--model.decoder.init_args.hidden_dim", "64",
        "--model.decoder.init_args.attention_dim", "32",
    ]  # fmt: skip
    show_tell_decoder = [
        "--model.decoder.class_path", "capline.models.ShowTellDecoder",
        "--model.decoder.init_args.embed_dim", "64", "--model.decoder.init_args.hidden_dim", "64",
    ]  # fmt: skip
    return {
        "show_tell": _fit(tmp, data, "show_tell", *show_tell_decoder),
        "attention": _fit(tmp, data, "attention", *attention_decoder),
        "data": data,
    }


@pytest.fixture(scope="module")
def images(trained, tmp_path_factory) -> dict:
    """Two synthetic scenes and variants of the first in every format; `readable` lists the good files sorted."""
    folder = tmp_path_factory.mktemp("images")
    shard = sorted(trained["data"].glob("val-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))), key=lambda m: m.name)
        scenes = [Image.open(tar.extractfile(m)).convert("RGB") for m in members[:2]]
    scene = scenes[0]
    scene.save(folder / "a_scene.jpg", quality=95)
    scenes[1].save(folder / "b_scene.png")
    scene.resize((1000, 700), Image.BICUBIC).save(folder / "big.jpg", quality=90)  # decoded at reduced scale
    scene.resize((300, 150), Image.BICUBIC).save(folder / "wide.png")
    scene.convert("L").save(folder / "gray.jpg")
    scene.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = np.array(scene.convert("RGBA"))
    rgba[:32, :, 3] = 0  # the top half transparent: composited on white
    Image.fromarray(rgba).save(folder / "alpha.png")
    scene.convert("P", palette=Image.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.fromarray(np.asarray(scene.convert("L"), dtype=np.uint16) * 257).save(folder / "deep16.png")
    raw = (folder / "gray.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "notes.txt").write_text("not an image: a folder scan skips it")
    assert Image.open(folder / "deep16.png").mode == "I;16" and Image.open(folder / "cmyk.jpg").mode == "CMYK"
    readable = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png") and p.name != "truncated.jpg")
    return {"folder": folder, "readable": readable, "truncated": folder / "truncated.jpg"}


def reference_generation(module, path: Path, beam_size: int):
    """What `CaptionModule.generate` says for one file, preprocessed as the training pipeline does."""
    transform = ImageTransform(module.encoder.data_config)
    pixels = transform(open_image(path.read_bytes(), draft_size=transform.resize_to))
    with torch.inference_mode():
        return pixels, module.generate(pixels.unsqueeze(0), beam_size)


# ---- the command ----------------------------------------------------------------------------------------------
def test_lines_warnings_and_exit_code_of_the_real_command(trained, images):
    missing = images["folder"] / "missing.jpg"
    result = subprocess.run(
        [*COMMAND, "--ckpt", trained["show_tell"], images["folder"], str(missing),
         "--batch-size", "3", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images["readable"]]
    # path<TAB>caption; a 12-step model may end a caption at once, so a caption can be empty
    assert all(line.count("\t") == 1 for line in lines), lines
    errors = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert errors[0].startswith(f"capline caption: warning: skipped {images['truncated']}: corrupt_image")
    assert errors[1] == f"capline caption: warning: skipped {missing}: No such file or directory"
    assert errors[2:] == [f"capline caption: 2 of {len(images['readable']) + 2} images could not be read"]


def test_captions_equal_generate_on_the_training_preprocessing(trained, images, capsys):
    assert caption("--ckpt", trained["show_tell"], images["folder"], "--json") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(set(row) == {"image", "caption"} for row in printed)
    assert [row["image"] for row in printed] == [str(p) for p in images["readable"]]

    module = load_caption_module(trained["show_tell"])
    stored = torch.load(trained["show_tell"], map_location="cpu", weights_only=False)
    assert module.vocab.words == stored["vocab"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, stored["state_dict"][name]), name
    captioner = Captioner(module)
    assert captioner.beam_size == stored["hyper_parameters"]["test_beam_size"] == 3  # the default beam
    for path, row in zip(images["readable"], printed):
        pixels, generation = reference_generation(module, path, beam_size=3)
        assert torch.equal(captioner.read(path).model_input, pixels), path
        assert row["caption"] == module.vocab.decode(generation.tokens[0].tolist()), path


def test_out_writes_captioned_images_and_no_attention_figure_for_show_tell(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert caption("--ckpt", trained["show_tell"], images["folder"], "--out", out) == 0
    captions = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_caption.png" for p in images["readable"])
    for path in images["readable"]:
        drawn = np.asarray(Image.open(out / f"{path.stem}_caption.png").convert("L"))
        with Image.open(path) as original:
            # Upscaled to a legible size (a large image is shown whole, at most 1024 px), aspect ratio kept.
            scale = min(max(1.0, 320 / min(original.size)), 1024 / max(original.size))
            shown_w, shown_h = round(original.width * scale), round(original.height * scale)
        assert drawn.shape[1] == shown_w >= 256 and drawn.shape[0] > shown_h, (path, drawn.shape)
        band = drawn[shown_h:]  # the caption, in black on white, under the image
        assert band.max() == 255 and (band < 100).sum() > 10 * len(captions[str(path)]), path
    assert not list(out.glob("*_attention.png"))


def test_attention_figures_and_weights(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert caption("--ckpt", trained["attention"], images["folder"], "--out", out, "--beam-size", "2") == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(images["readable"])
    for path in images["readable"]:
        assert (out / f"{path.stem}_caption.png").is_file()
        with Image.open(out / f"{path.stem}_attention.png") as figure:
            assert figure.width >= 2 * 224 and figure.height >= 224, path

    module = load_caption_module(trained["attention"])
    captioner = Captioner(module, beam_size=2)
    [result] = captioner.caption_files([images["readable"][0]])
    _, generation = reference_generation(module, images["readable"][0], beam_size=2)
    length = len(result.tokens)
    assert result.attention.shape == (length, *captioner.grid)
    torch.testing.assert_close(torch.from_numpy(result.attention).flatten(1), generation.alphas[0, :length])
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # a distribution per word


# ---- failures -------------------------------------------------------------------------------------------------
def test_a_bad_checkpoint_is_one_line_and_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    result = subprocess.run(
        [*COMMAND, "--ckpt", str(missing), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"capline caption: error: checkpoint {str(missing)!r} does not exist"]

    not_torch = tmp_path / "notes.ckpt"
    not_torch.write_text("hello")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {}}, foreign)  # Lightning's, no vocab
    for ckpt, words in [(not_torch, "not a PyTorch checkpoint"), (foreign, "not a capline checkpoint")]:
        assert caption("--ckpt", ckpt, tmp_path) == 2
        captured = capsys.readouterr()
        [error] = captured.err.splitlines()
        assert error.startswith("capline caption: error:") and str(ckpt) in error and words in error, error
        assert captured.out == ""


def test_unsafe_objects_in_a_checkpoint_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "vocab": [], "hyper_parameters": {"args": argparse.Namespace(a=1)}}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe to load"):
        load_caption_module(unsafe)


def test_no_readable_image_is_exit_code_1(trained, images, capsys):
    assert caption("--ckpt", trained["show_tell"], images["truncated"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "capline caption: error: no image could be captioned"
    empty = images["folder"] / "empty"
    empty.mkdir(exist_ok=True)
    assert caption("--ckpt", trained["show_tell"], empty) == 1


def test_bad_arguments_are_exit_code_2(trained, images, capsys):
    for argv in (["--beam-size", "0"], ["--batch-size", "x"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            caption("--ckpt", trained["show_tell"], images["folder"], *argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_checkpoint_copied_alone_loads_by_itself(trained, images, tmp_path, capsys):
    alone = tmp_path / "alone.ckpt"
    shutil.copy(trained["show_tell"], alone)
    checkpoint = torch.load(alone, map_location="cpu", weights_only=True)
    assert checkpoint["config"]["model"]["decoder"]["class_path"] == "capline.models.ShowTellDecoder"
    assert caption("--ckpt", alone, images["readable"][0]) == 0  # no run folder, no config.yaml next to it
    assert capsys.readouterr().out.startswith(f"{images['readable'][0]}\t")
    run_config = trained["show_tell"].parents[1] / "config.yaml"
    assert caption("--ckpt", alone, "--run-config", run_config, images["readable"][0]) == 0
    assert capsys.readouterr().out.startswith(f"{images['readable'][0]}\t")


def test_find_images_takes_files_as_given_and_folders_sorted(images):
    found = find_images([images["folder"], images["truncated"]])
    assert found == [*sorted(images["readable"] + [images["truncated"]]), images["truncated"]]
