"""SCST through the real `capline` command: logging, exact resume inside the SCST phase, DDP, missing references."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from wandb_records import read_run, run_files, series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS, SWITCH = 24, 10  # test_resume's STEPS: 10 cross-entropy steps, then 14 of SCST


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def scst_args(tmp_path: Path, name: str, data: Path | None = None) -> list[str]:
    """configs/demo.yaml + configs/scst.yaml, shrunk: 320 scenes, batches of 16, the switch at step 10."""
    run = tmp_path / name
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--config", str(ROOT / "configs/scst.yaml"),
        "--data.synthetic.root", str(data or tmp_path / "data"),
        "--data.synthetic.num_train", "320",  # 20 batches of 16 per epoch: checkpoints fall mid-epoch
        "--data.synthetic.num_val", "16",
        "--data.global_batch_size", "16",
        "--data.num_workers", "2",
        "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", "12",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
        "--checkpoint.every_n_train_steps", "4",
        "--trainer.log_every_n_steps", "2",
        "--model.encoder_finetuning.freeze_steps", "4",
        "--model.scheduled_sampling.start_step", "4",  # scheduled sampling runs before the switch, not after
        "--model.scst.start_step", str(SWITCH),
        "--model.scst.num_samples", "3",
    ]  # fmt: skip


def final_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def kill_inside_scst(cmd: list[str], ckpt: Path, tmp_path: Path) -> int:
    """Starts a run and SIGKILLs it once a checkpoint from inside the SCST phase exists; returns its step."""
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            time.sleep(0.5)  # let the atomic save finish its rename
            step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
            if SWITCH < step < STEPS - 4:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return step
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no checkpoint inside the SCST phase appeared before the run ended")


@pytest.mark.slow
def test_sigkill_inside_scst_then_resume_equals_uninterrupted_run_and_scst_is_logged(tmp_path):
    data = tmp_path / "data"
    straight = scst_args(tmp_path, "straight", data)
    subprocess.run([CAPLINE, "fit", *straight], env=env(tmp_path), check=True, capture_output=True)
    run = read_run(run_files(tmp_path / "straight")[0])
    phase = series(run, "train/phase")
    assert phase[0] == 0.0 and phase[-1] == 1.0 and sorted(phase) == phase
    for key in ("reward", "baseline", "advantage_std", "greedy_reward", "sample_length", "greedy_length"):
        values = series(run, f"train/scst_{key}")
        assert values and all(v >= 0 for v in values), key
    assert series(run, "train/ss_prob")[-1] == 0.0  # no scheduled sampling during SCST
    scst_lr = yaml.safe_load((ROOT / "configs/scst.yaml").read_text())["model"]["scst"]["lr"]
    assert series(run, "train/lr")[-1] == pytest.approx(scst_lr)  # scst.yaml's rate, constant after the switch
    assert sorted(data.glob("cider-df-*.pt"))  # the corpus statistics, cached next to vocab.json

    resumed = scst_args(tmp_path, "resumed", data)
    ckpt = tmp_path / "resumed/checkpoints/last.ckpt"
    killed_at = kill_inside_scst([CAPLINE, "fit", *resumed], ckpt, tmp_path)
    assert SWITCH < killed_at < STEPS and killed_at % 20 != 0  # inside SCST, mid-epoch
    assert "scst_reward" in torch.load(ckpt, map_location="cpu", weights_only=True)
    result = subprocess.run([CAPLINE, "fit", *resumed, "--ckpt_path", "last"], env=env(tmp_path),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert expected.keys() == got.keys() and not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_two_process_scst_run_ends_with_identical_weights_on_both_ranks(tmp_path):
    record = tmp_path / "record"
    args = scst_args(tmp_path, "ddp") + [
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.num_workers", "1",
        "--trainer.max_steps", "8", "--model.scst.start_step", "4", "--trainer.val_check_interval", "8",
        "--model.scst.baseline", "mean", "--model.scst.train_encoder", "false",
        "--trainer.callbacks+=model_digest.ModelDigest", "--trainer.callbacks.out_dir", str(record),
    ]  # fmt: skip
    result = subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [8, 8]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


def test_training_shards_without_references_fail_in_one_sentence_before_training(tmp_path):
    from capline.data.shards import ShardWriter, encode_jpeg, shard_pattern
    from capline.data.synthetic import generate_scene
    from capline.vocab import Vocabulary

    out, captions = tmp_path / "shards", []
    with ShardWriter(out, "train", shard_size=100) as writer:
        for index in range(32):  # one sample per caption, as img2dataset writes them: none holds its references
            image, caps, _ = generate_scene(index)
            for n, caption in enumerate(caps[:2]):
                writer.write(
                    (f"{index:06d}_{n}", encode_jpeg(image), "jpg", {"image_id": index, "captions": [caption]})
                )
            captions += caps
    with ShardWriter(out, "val", shard_size=100) as writer:
        for index in range(1000, 1016):
            image, caps, _ = generate_scene(index)
            writer.write((f"{index:06d}", encode_jpeg(image), "jpg", {"image_id": index, "captions": caps}))
    Vocabulary.build(captions, min_count=1).save(out / "vocab.json")
    args = scst_args(tmp_path, "norefs") + [
        "--data.synthetic", "null", "--data.train_shards", shard_pattern(out, "train", 1),
        "--data.val_shards", shard_pattern(out, "val", 1), "--data.vocab", str(out / "vocab.json"),
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run([CAPLINE, "fit", *args], env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("capline: error:")]
    assert len(errors) == 1 and "model.scst" in errors[0] and "single caption" in errors[0], result.stderr[-2000:]
    assert not list((tmp_path / "norefs").glob("checkpoints/*.ckpt"))  # nothing was trained
    assert time.time() - start < 120


@pytest.mark.slow
def test_scst_added_to_a_finished_cross_entropy_run_trains_with_scst(tmp_path):
    """`fit --config scst.yaml --ckpt_path <a cross-entropy run's checkpoint>`: Lightning's CLI would put the
    checkpoint's hyper-parameters (scst: null) over the configured ones; capline keeps the configured ones, says so."""
    data = tmp_path / "data"
    args = scst_args(tmp_path, "xe", data)
    pairs = zip(args[::2], args[1::2])  # the demo's arguments without scst.yaml and the --model.scst ones
    pairs = [(key, value) for key, value in pairs if "scst" not in key and not value.endswith("scst.yaml")]
    cross_entropy_only = [arg for pair in pairs for arg in pair]
    cross_entropy_only += ["--trainer.max_steps", str(SWITCH), "--trainer.val_check_interval", str(SWITCH)]
    subprocess.run([CAPLINE, "fit", *cross_entropy_only], env=env(tmp_path), check=True, capture_output=True)
    assert torch.load(tmp_path / "xe/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["scst"] is None

    continued = scst_args(tmp_path, "continued", data) + [
        "--trainer.max_steps", str(SWITCH + 4), "--trainer.val_check_interval", "14",
        "--ckpt_path", str(tmp_path / "xe/checkpoints/last.ckpt"),
    ]  # fmt: skip
    result = subprocess.run([CAPLINE, "fit", *continued], env=env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.scst differs from the checkpoint's; fit continues with the configured values" in result.stderr
    run = read_run(run_files(tmp_path / "continued")[0])
    assert series(run, "train/phase")[-1] == 1.0 and series(run, "train/scst_reward")
