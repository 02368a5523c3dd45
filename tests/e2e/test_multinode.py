"""The README's torchrun multi-node command, as two torchrun "nodes" on 127.0.0.1 (one CPU process each, gloo,
c10d rendezvous): a run, then a resume of it that continues the stream where it stopped, quietly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(tmp_path: Path, data: dict, record: Path, *extra: str) -> list[tuple[int, str]]:
    """Runs the README's command on two "nodes" at once; returns each node's (exit status, stderr)."""
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"capline-{port}"]  # fmt: skip
    capline = [
        "-m", "capline", "fit",
        "--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/multinode.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",  # the CPU stand-in
        "--data.synthetic", "null", "--data.train_shards", data["train_shards"],
        "--data.val_shards", data["val_shards"], "--data.vocab", data["vocab"],
        "--data.global_batch_size", "8", "--data.num_workers", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"),  # one folder for both, as on a shared file system
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.callbacks+=recorder.RankRecorder", "--trainer.callbacks.out_dir", str(record), *extra,
    ]  # fmt: skip
    home = tmp_path / "wandb-home"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
           "WANDB_CACHE_DIR": str(home), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    logs = [record.with_name(f"{record.name}-node{n}.log") for n in range(2)]  # files: a full pipe would block
    nodes = [subprocess.Popen([*torchrun, *capline], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=log.open("w")) for log in logs]  # fmt: skip
    try:
        return [(node.wait(timeout=1500), log.read_text()) for node, log in zip(nodes, logs)]
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # four torchrun processes on a 2-core machine: minutes each
def test_readme_torchrun_command_on_two_nodes_runs_and_resumes(tmp_path, synthetic_data):
    first = two_nodes(tmp_path, synthetic_data, tmp_path / "first", "--trainer.max_steps", "4")
    for status, stderr in first:
        assert status == 0, stderr[-4000:]
    resumed = two_nodes(tmp_path, synthetic_data, tmp_path / "resumed", "--trainer.max_steps", "8",
                        "--ckpt_path", "last")  # fmt: skip
    for status, stderr in resumed:
        assert status == 0, stderr[-4000:]
        assert "not resumable" not in stderr and "sync_dist" not in stderr
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["global_step"] == 8

    # 2 ranks x 4 images a step; an epoch is 64 steps, so both jobs trained in epoch 0
    before = [json.loads((tmp_path / f"first/rank{r}.json").read_text()) for r in (0, 1)]
    after = [json.loads((tmp_path / f"resumed/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in after] == [8, 8]
    keys = [set(r["keys"]["0"]) for r in before + after]
    assert [len(k) for k in keys] == [16, 16, 16, 16]
    assert len(set().union(*keys)) == 64  # the resumed job went on with new samples: none seen twice, by any rank
    assert after[0]["encoder_sha256"] == after[1]["encoder_sha256"]
