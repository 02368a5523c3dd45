"""Resuming after SIGKILL is indistinguishable from never stopping: same weights, same W&B run, monotonic steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from wandb_records import read_run, run_files, series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24


def args_for(tmp_path: Path, data: Path, name: str) -> list[str]:
    run = tmp_path / name
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic.root", str(data),
        "--data.synthetic.num_train", "320",  # 20 batches of 16 per epoch: checkpoints fall mid-epoch
        "--data.synthetic.num_val", "32",
        "--data.global_batch_size", "16",
        "--data.num_workers", "2",
        "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", "12",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
        "--checkpoint.every_n_train_steps", "6",
        "--trainer.log_every_n_steps", "2",
        # the whole recipe, so its state is part of what must resume exactly
        "--model.encoder_finetuning.freeze_steps", "8",
        "--model.encoder_finetuning.warmup_steps", "4",
        "--model.scheduled_sampling.schedule", "linear",
        "--model.scheduled_sampling.slope", "0.02",
    ]  # fmt: skip


def env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home), "PYTHONUNBUFFERED": "1"}  # fmt: skip


def final_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True
        time.sleep(0.1)
    return False


def kill_after_checkpoint(cmd: list[str], ckpt: Path, tmp_path: Path) -> int:
    """Starts a run and SIGKILLs it once a mid-epoch checkpoint exists; returns that checkpoint's step."""
    proc = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            time.sleep(0.5)  # let the atomic save finish its rename
            step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
            if 6 <= step < STEPS - 6:
                workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                assert workers and all(gone_within(int(pid), 10) for pid in workers), "loader workers outlived it"
                return step
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no mid-run checkpoint appeared before the run ended")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    straight = args_for(tmp_path, data, "straight")
    subprocess.run([CAPLINE, "fit", *straight], env=env(tmp_path), check=True, capture_output=True)

    resumed = args_for(tmp_path, data, "resumed")
    killed_at = kill_after_checkpoint([CAPLINE, "fit", *resumed], tmp_path / "resumed/checkpoints/last.ckpt", tmp_path)
    assert killed_at % 20 != 0  # mid-epoch
    result = subprocess.run([CAPLINE, "fit", *resumed, "--ckpt_path", "last"], env=env(tmp_path),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    # W&B: one run id before and after the kill, and its steps never go back.
    # wandb-core buffers its run file and is torn down with the killed process, so the killed run's file may hold
    # anything from nothing to every record up to the kill; the run id is also in its directory's name.
    files = run_files(tmp_path / "resumed")
    runs = [read_run(f) for f in files]
    assert len(files) == 2 and len({f.parent.name.rsplit("-", 1)[1] for f in files}) == 1
    assert {r["run_id"] for r in runs} - {None} == {files[0].parent.name.rsplit("-", 1)[1]}
    wandb_steps = [s for r in runs for s in series(r, "_step")]
    assert wandb_steps == sorted(set(wandb_steps))  # W&B's step axis only moves forward, across the kill too
    killed, resumed_steps = (series(r, "trainer/global_step") for r in runs)
    assert min(resumed_steps) > max(killed, default=killed_at)  # steps trained again are not logged twice
    assert max(resumed_steps) >= STEPS - 1


def test_ckpt_path_last_on_a_first_run_just_starts(tmp_path):
    data = tmp_path / "data"
    args = args_for(tmp_path, data, "first")
    args[args.index("--trainer.max_steps") + 1] = "2"
    result = subprocess.run([CAPLINE, "fit", *args, "--ckpt_path", "last"], env=env(tmp_path),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting a new run" in result.stderr
    assert (tmp_path / "first/checkpoints/last.ckpt").exists()


def test_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    from capline.checkpoints import read_checkpoint

    args = args_for(tmp_path, tmp_path / "data", "stalled")
    marker = tmp_path / "stalled.marker"
    run_env = env(tmp_path) | {
        "CAPLINE_TEST_STALL_SAVE": "2",  # the first save of last.ckpt completes, the second stalls
        "CAPLINE_TEST_STALL_MARKER": str(marker),
        "PYTHONPATH": f"{Path(__file__).parent / 'slow_disk'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.Popen([CAPLINE, "fit", *args], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no stalled save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    half_written = Path(marker.read_text())
    assert half_written.parent == tmp_path / "stalled/checkpoints" and half_written.name.endswith(".tmp")
    assert 0 < half_written.stat().st_size  # killed with half a checkpoint on disk...
    checkpoint = read_checkpoint(tmp_path / "stalled/checkpoints/last.ckpt")  # ...and the previous one whole
    assert checkpoint["global_step"] in (6, 12) and len(checkpoint["state_dict"]) > 0
