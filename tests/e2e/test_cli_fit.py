"""End to end: the real `capline` command trains the demo config (shrunk), writes checkpoints and W&B files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from wandb_records import read_run, run_files, series  # noqa: E402

from capline.data.synthetic import VAL_INDEX_OFFSET, encode_scene, generate_scene, scene_record  # noqa: E402
from capline.metrics.scene_truth import judge_caption  # noqa: E402
from capline.vocab import tokenize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def shrunk_demo_args(tmp_path: Path, steps: int = 24) -> list[str]:
    """The demo config, shrunk to seconds: fewer scenes, smaller batches, fewer steps."""
    run = tmp_path / "run"
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic.root", str(tmp_path / "data"),
        "--data.synthetic.num_train", "320",
        "--data.synthetic.num_val", "48",
        "--data.global_batch_size", "16",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "12",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
        "--checkpoint.every_n_train_steps", "12",
    ]  # fmt: skip


def capline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([CAPLINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("fit")
    home = tmp_path / "wandb-home"
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(home), WANDB_CACHE_DIR=str(home), WANDB_CONFIG_DIR=str(home))
    args = shrunk_demo_args(tmp_path)
    result = capline("fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"tmp": tmp_path, "run": tmp_path / "run", "args": args, "result": result}


def test_fit_writes_pinned_checkpoints_with_vocabulary(trained):
    ckpt_dir = trained["run"] / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file()
    ranked = [p for p in ckpt_dir.glob("step*-cider*.ckpt")]
    assert ranked, sorted(os.listdir(ckpt_dir))
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    vocab = json.loads((trained["tmp"] / "data/vocab.json").read_text())["words"]
    assert ckpt["vocab"] == vocab
    assert ckpt["global_step"] == 24


def test_fit_logs_losses_and_caption_metrics_to_offline_wandb(trained):
    files = run_files(trained["run"])
    assert len(files) == 1
    run = read_run(files[0])
    losses = series(run, "train/loss")
    assert len(losses) >= 2 and losses[-1] < losses[0]  # it learns
    ciders = series(run, "val/cider")
    assert len(ciders) == 2 and all(math.isfinite(c) and c >= 0 for c in ciders)
    assert all(0 < u <= 1 for u in series(run, "val/unique_captions"))
    assert series(run, "val/num_images") == [48, 48]  # every validation image scored once
    for key in ("train/lr", "train/ss_prob", "train/encoder_trainable", "val/loss", "data/skipped"):
        assert series(run, key), key
    # The synthetic shards carry each scene's truth: whether captions are true is logged at every validation.
    for key in ("val/scene_accuracy", "val/objects_correct", "val/relation_correct"):
        values = series(run, key)
        assert len(values) == 2 and all(0 <= v <= 1 for v in values), (key, values)
    uniform = series(run, "val/attention_uniform")  # measured on true captions only: maybe none this early
    assert all(0 < u < 0.5 for u in uniform), uniform
    config = run["config"]["config"]
    assert config["trainer"]["max_steps"] == 24 and config["data"]["global_batch_size"] == 16
    # Rows go forward in trainer/global_step, Lightning's step for loggers (the index of the batch just trained):
    # a validation after step 12 is logged at 11, its samples table too.
    steps = [row["trainer/global_step"] for row in run["history"] if "trainer/global_step" in row]
    assert steps == sorted(steps), steps
    interval = config["trainer"]["val_check_interval"]
    for key in ("val/cider", "val/samples"):  # the table's fields are val/samples/... (their names vary with W&B)
        val_steps = [row["trainer/global_step"] for row in run["history"] if any(k.startswith(key) for k in row)]
        assert val_steps == [interval * (i + 1) - 1 for i in range(len(ciders))], (key, val_steps)


def test_validation_samples_table_has_images_captions_references_and_cider(trained):
    run_dir = run_files(trained["run"])[0].parent
    tables = sorted((run_dir / "files/media/table/val").glob("samples_*.table.json"))
    assert len(tables) == 2  # one per validation
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["kind", "image_id", "image", "generated", "references", "cider", "true"]
    assert len(table["data"]) >= 16
    kinds = {row[0] for row in table["data"]}
    assert kinds == {"best", "worst", "tracked"}
    best = [row[5] for row in table["data"] if row[0] == "best"]
    worst = [row[5] for row in table["data"] if row[0] == "worst"]
    assert min(best) >= max(worst)
    # The `true` column is the generator's verdict on each generated caption, whatever its CIDEr-D.
    for row in table["data"]:
        assert row[1] >= VAL_INDEX_OFFSET  # validation scenes are never training scenes
        _, captions, attributes = generate_scene(row[1])
        codes, _ = encode_scene(scene_record(attributes))
        assert row[6] == judge_caption(tokenize(row[3]), codes)[0], row[3]
        assert row[4] == " | ".join(captions)


def test_capline_test_scores_a_checkpoint(trained):
    ckpt = trained["run"] / "checkpoints" / "last.ckpt"
    result = capline("test", *trained["args"], "--ckpt_path", str(ckpt), cwd=trained["tmp"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/cider" in result.stdout and "test/Bleu_4" in result.stdout and "test/METEOR" in result.stdout
    results = json.loads((trained["run"] / "test_results.json").read_text())
    assert len(results) == 48 and len({r["image_id"] for r in results}) == 48
    assert all(isinstance(r["caption"], str) for r in results)


def fails_fast(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("capline: error:")
    for word in words:
        assert word in message, message


def test_truncated_or_foreign_checkpoint_is_refused_with_one_sentence(trained):
    good = (trained["run"] / "checkpoints" / "last.ckpt").read_bytes()
    truncated = trained["tmp"] / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 2])
    fails_fast(capline("validate", *trained["args"], "--ckpt_path", str(truncated), cwd=trained["tmp"]),
               "truncated.ckpt", "cannot be read")  # fmt: skip
    foreign = trained["tmp"] / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    fails_fast(capline("validate", *trained["args"], "--ckpt_path", str(foreign), cwd=trained["tmp"]),
               "foreign.ckpt", "not a Lightning checkpoint")  # fmt: skip


def test_checkpoint_of_another_architecture_or_vocabulary_is_refused(trained):
    ckpt = str(trained["run"] / "checkpoints" / "last.ckpt")
    result = capline("validate", *trained["args"], "--ckpt_path", ckpt,
                     "--model.decoder.init_args.hidden_dim", "64", cwd=trained["tmp"])  # fmt: skip
    fails_fast(result, "another architecture", "decoder.")
    words = json.loads((trained["tmp"] / "data/vocab.json").read_text())["words"]
    other = trained["tmp"] / "other-vocab.json"
    other.write_text(json.dumps({"words": words + ["zebra"]}))
    val_shards = str(trained["tmp"] / "data/val-{000000..000000}.tar")
    result = capline("validate", *trained["args"], "--ckpt_path", ckpt, "--data.synthetic", "null",
                     "--data.vocab", str(other), "--data.val_shards", val_shards, cwd=trained["tmp"])  # fmt: skip
    fails_fast(result, "vocabulary", f"{len(words)} words", f"{len(words) + 1} words")


def test_precision_the_cpu_cannot_run_fails_fast(trained):
    fails_fast(capline("fit", *trained["args"], "--trainer.precision", "16-mixed", cwd=trained["tmp"]),
               "16-mixed", "needs a GPU")  # fmt: skip


def test_unwritable_output_dir_fails_before_training(trained, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a path below a file cannot be created, even by root
    result = capline("fit", *trained["args"], "--checkpoint.dirpath", str(blocker / "ckpts"), cwd=trained["tmp"])
    fails_fast(result, "cannot write checkpoints", "a-file/ckpts")
