"""What a run tells its user: no false "not resumable" warning on resume, W&B files under the run's root, and one
summary at the end of fit (checkpoints, W&B run and its sync command, the caption command)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_training_loader_of_capline_is_resumable():
    from capline.data.buffers import RecyclingDataLoader

    class Position:
        def state_dict(self):
            return {"epoch": 0, "batches": 3}

        def load_state_dict(self, state):
            self.loaded = state

    position = Position()
    loader = RecyclingDataLoader([1, 2], batch_size=None, stream_state=position)
    assert isinstance(loader, _Stateful) and loader.state_dict() == {"epoch": 0, "batches": 3}
    loader.load_state_dict({"epoch": 0, "batches": 5})
    assert position.loaded == {"epoch": 0, "batches": 5}
    assert not isinstance(DataLoader([1, 2]), _Stateful)  # a user's own loader keeps Lightning's warning


@pytest.mark.slow
def test_resume_is_quiet_and_the_run_ends_with_a_summary(tmp_path, synthetic_data):
    run = tmp_path / "run"
    home = tmp_path / "wandb-home"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
           "WANDB_CACHE_DIR": str(home)}  # fmt: skip
    args = [
        "--config", str(ROOT / "configs/demo.yaml"), "--data.synthetic", "null",
        "--data.train_shards", synthetic_data["train_shards"], "--data.val_shards", synthetic_data["val_shards"],
        "--data.vocab", synthetic_data["vocab"], "--data.global_batch_size", "16", "--data.num_workers", "1",
        "--trainer.default_root_dir", str(run),  # and no logger save_dir: W&B follows the root
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
    ]  # fmt: skip
    first = subprocess.run([CAPLINE, "fit", *args, "--trainer.max_steps", "3"], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run([CAPLINE, "fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 6
    assert "Restoring states from the checkpoint" in resumed.stderr  # resumed mid-epoch (32 batches an epoch)...
    assert "not resumable" not in resumed.stderr  # ...and Lightning knows the stream resumes
    for job in (first, resumed):  # no library line that contradicts capline or only advertises
        assert "anonymous setting" not in job.stderr and "litlogger" not in job.stderr + job.stdout

    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2  # the first job's and the resumed job's files of the same run, under the root

    summary = resumed.stdout[resumed.stdout.index("capline: fit ended at step 6") :]
    best = re.search(r"best checkpoint: (\S+) \(val/cider ([0-9.]+)\)", summary)
    assert best and Path(best.group(1)).is_file() and Path(best.group(1)).parent == run / "checkpoints"
    assert f"last checkpoint: {run / 'checkpoints/last.ckpt'}" in summary
    run_id = wandb_runs[-1].name.rsplit("-", 1)[1]
    assert f"offline run {run_id}; upload it with: wandb sync {wandb_runs[-1]}" in summary
    assert f"capline predict --config {run / 'config.yaml'} --ckpt_path {best.group(1)}" in summary
