"""capline as a user installs it: the built wheel in a fresh venv outside the checkout, run from an empty folder.

The demo trains a few steps and prints its summary, `capline shards flickr` writes shards of a tiny folder of real
photos, `capline predict` and `capline caption` caption them with the demo's checkpoint, and `capline configs`,
`capline evaluate` and `capline scene-check` run, every one from the installed package alone (no `configs/`, no
`tools/`, no checkout on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "tests" / "fixtures" / "flickr8k-sample"
COCO_DEMO = ROOT / "tests" / "fixtures" / "coco-caption-demo"
STEPS = 30

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command[:3]}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built by pip from the checkout, installed into a new venv (the tested versions: constraints.txt)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp / "dist")], tmp, env)
    wheel = next((tmp / "dist").glob("capline-*.whl"))
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin") or sys.executable
    base = subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True)
    run([f"{base.stdout.strip()}/bin/python3", "-m", "venv", str(tmp / "venv")], tmp, env)
    started = time.monotonic()
    run([str(tmp / "venv/bin/pip"), "install", "-q", str(wheel), "-c", str(ROOT / "constraints.txt")], tmp, env, 900)
    print(f"\npip install {wheel.name} into a new venv: {time.monotonic() - started:.0f} s")
    empty = tmp / "user"
    empty.mkdir()
    env = {**env, "PATH": f"{tmp / 'venv/bin'}{os.pathsep}{env['PATH']}", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp / "wandb-home"), "WANDB_CONFIG_DIR": str(tmp / "wandb-home")}  # fmt: skip
    return {"capline": str(tmp / "venv/bin/capline"), "python": str(tmp / "venv/bin/python"), "cwd": empty,
            "env": env, "wheel": wheel}  # fmt: skip


@pytest.fixture(scope="module")
def demo(installed) -> dict:
    """`capline fit --config demo` for a few steps, from the empty folder."""
    done = run([installed["capline"], "fit", "--config", "demo", "--data.synthetic.num_train", "480",
                "--data.synthetic.num_val", "48", "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval",
                str(STEPS)], installed["cwd"], installed["env"])  # fmt: skip
    return {"stderr": done.stderr, "stdout": done.stdout, "ckpt": installed["cwd"] / "runs/demo/checkpoints/last.ckpt"}


def test_the_wheel_holds_the_package_and_its_configs_and_nothing_of_the_checkout_is_used(installed):
    code = "import capline, capline.config_files as c; print(capline.__file__); print(sorted(c.packaged_configs()))"
    where = run([installed["python"], "-c", code], installed["cwd"], installed["env"]).stdout.splitlines()
    assert "site-packages" in where[0] and not where[0].startswith(str(ROOT))
    assert {"demo", "flickr8k_cpu", "coco_show_tell", "scst"} <= set(json.loads(where[1].replace("'", '"')))
    listed = run([installed["capline"], "configs"], installed["cwd"], installed["env"]).stdout
    assert "demo" in listed and "site-packages" in listed
    printed = run([installed["capline"], "configs", "demo"], installed["cwd"], installed["env"]).stdout
    assert printed == (ROOT / "capline/configs/demo.yaml").read_text()


def test_the_demo_trains_from_an_empty_folder_and_prints_its_summary(demo):
    summary = (demo["stdout"] + demo["stderr"]).split("capline: fit ended at step ")[-1]
    assert summary.startswith(f"{STEPS}\n"), (demo["stdout"] + demo["stderr"])[-3000:]
    assert f"last checkpoint: {demo['ckpt']} (step {STEPS})" in summary
    assert demo["ckpt"].is_file()


def test_shards_predict_and_caption_on_a_folder_of_photos(installed, demo):
    cwd, env = installed["cwd"], installed["env"]
    photos = cwd / "photos"
    photos.mkdir()
    names = (PHOTOS / "images.txt").read_text().split()[:4]
    for name in names:
        shutil.copy(PHOTOS / name, photos / name)
    (cwd / "split.txt").write_text("\n".join(names) + "\n")
    made = run([installed["capline"], "shards", "flickr", "--images", "photos", "--captions",
                str(PHOTOS / "Flickr8k.token.txt"), "--split-file", "split.txt", "--split", "train", "--out", "shards",
                "--min-count", "1", "--no-progress"], cwd, env)  # fmt: skip
    assert "wrote 4 samples" in made.stdout + made.stderr, made.stdout + made.stderr
    assert sorted(p.name for p in (cwd / "shards").iterdir()) == ["train-000000.tar", "train-index.json", "vocab.json"]

    predicted = run([installed["capline"], "predict", "--config", "runs/demo/config.yaml", "--ckpt_path",
                     str(demo["ckpt"]), "--data.predict_images", "photos/", "--trainer.logger", "false"],
                    cwd, env)  # fmt: skip
    written = [json.loads(line) for line in (cwd / "runs/demo/predictions.jsonl").read_text().splitlines()]
    assert sorted(Path(row["file"]).name for row in written) == sorted(names), predicted.stderr[-2000:]

    captioned = run([installed["capline"], "caption", "--ckpt", str(demo["ckpt"]), "photos/", "--json"], cwd, env)
    rows = [json.loads(line) for line in captioned.stdout.splitlines()]
    assert sorted(Path(row["image"]).name for row in rows) == sorted(names)
    by_image = {Path(row["image"]).name: row["caption"] for row in rows}
    assert by_image == {Path(row["file"]).name: row["caption"] for row in written}  # the same model, the same beam
    assert all(caption and "<unk>" not in caption for caption in by_image.values())


def test_evaluate_and_scene_check_run_from_the_package(installed, demo):
    if shutil.which("java") is None:
        pytest.skip("the official metrics run Java")
    cwd, env = installed["cwd"], installed["env"]
    scored = run([installed["capline"], "evaluate", "--annotations", str(COCO_DEMO / "captions_val2014_subset.json"),
                  "--results", str(COCO_DEMO / "captions_val2014_fakecap_results.json"), "--json", "--no-spice"],
                 cwd, env)  # fmt: skip
    scores = json.loads(scored.stdout.splitlines()[-1])
    published = json.loads((COCO_DEMO / "expected_scores.json").read_text())["published_3dp"]
    assert round(scores["CIDEr"], 3) == published["CIDEr"] and round(scores["Bleu_4"], 3) == published["Bleu_4"]
    checked = run([installed["capline"], "scene-check", "--ckpt", str(demo["ckpt"]), "--num", "20", "--json"], cwd, env)
    figures = json.loads(checked.stdout.splitlines()[-1])
    assert figures["num_scenes"] == 20 and 0.0 <= figures["scene_accuracy"] <= 1.0
