"""SIGTERM to the real `capline fit`, on 1 process and on 2 DDP (gloo) processes with dataloader workers: one
checkpoint at the next step boundary, exit code 75 and one line, and a resume bitwise equal to a run never stopped.
Which checkpoint `--ckpt_path last` takes, whatever the names and times of the files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from preemption_runs import (  # noqa: E402
    checkpoint_names,
    differing_tensors,
    fit_args,
    history_differences,
    load,
    probe,
    run_env,
)

from capline.preemption import EXIT_PREEMPTED, PREEMPTION_CHECKPOINT  # noqa: E402
from capline.preflight import find_last_checkpoint  # noqa: E402

STEPS = 12


def sigterm_at_step(cmd: list[str], env: dict, run: Path, step: int, whole_group: bool) -> tuple[int, float, str]:
    """Starts `cmd`, sends SIGTERM once rank 0 has finished `step` steps (to the main process, or to every process
    of the command: ranks and dataloader workers); returns (exit code, seconds from signal to exit, stderr)."""
    err = run.with_suffix(".stderr")
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.time() + 500
        while proc.poll() is None and time.time() < deadline and not any(r["step"] >= step for r in probe(run)):
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before step {step}: {err.read_text()[-3000:]}"
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM) if whole_group else proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        exited = time.monotonic() - sent
        while True:  # the other ranks and the workers are gone too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() - sent < 120, "processes of the preempted run are still alive"
            time.sleep(0.1)
    return code, exited, err.read_text()


def first_signalled_step(run: Path, rank: int = 0) -> int:
    records = probe(run, rank)
    return next((r["step"] for r in records if r["signalled"]), records[-1]["step"])


def check_preempted_then_resumed(tmp_path: Path, shards: dict, devices: int, workers: int, whole_group: bool,
                                 after_step: int, extra: tuple[str, ...] = ()):  # fmt: skip
    env = run_env(tmp_path)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    done = subprocess.run([CAPLINE, "fit", *fit_args(straight, shards, STEPS, devices, workers), *extra], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    args = [*fit_args(preempted, shards, STEPS, devices, workers), *extra]
    code, seconds, stderr = sigterm_at_step([CAPLINE, "fit", *args], env, preempted, after_step, whole_group)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("capline: preempted:")]
    assert len(lines) == 1 and f"exiting with code {EXIT_PREEMPTED}" in lines[0], stderr[-2000:]
    saved = load(preempted / "checkpoints" / PREEMPTION_CHECKPOINT)
    # the step boundary right after the signal, the same on every rank
    stops = [probe(preempted, rank)[-1]["step"] for rank in range(devices)]
    assert saved["global_step"] == first_signalled_step(preempted) == stops[0] and len(set(stops)) == 1, stops
    written = float(re.search(r"([0-9.]+) s after SIGTERM", lines[0]).group(1))
    print(
        f"\n{devices} process(es): SIGTERM after step {first_signalled_step(preempted) - 1}, checkpoint at step "
        f"{saved['global_step']} written {written:.1f} s after it, every process gone {seconds:.1f} s after it"
    )

    resumed = subprocess.run([CAPLINE, "fit", *args, "--ckpt_path", "last"], env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoints/{PREEMPTION_CHECKPOINT}" in resumed.stderr  # Lightning's "Restoring states from ..."
    assert load(preempted / "checkpoints/last.ckpt")["global_step"] == STEPS
    different = differing_tensors(straight / "checkpoints/last.ckpt", preempted / "checkpoints/last.ckpt")
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert checkpoint_names(preempted) == checkpoint_names(straight) | {PREEMPTION_CHECKPOINT}
    assert not history_differences(straight, preempted), history_differences(straight, preempted)[:5]


@pytest.mark.slow
def test_sigterm_on_one_process_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, synthetic_data):
    # the step at which it stops is followed by a validation (every 6 steps): the checkpoint comes after it
    check_preempted_then_resumed(tmp_path, synthetic_data, devices=1, workers=2, whole_group=False, after_step=5)


@pytest.mark.slow
def test_sigterm_to_two_ddp_ranks_and_their_workers_stops_both_at_one_step(tmp_path, synthetic_data):
    # SLURM and torchrun signal every process: the ranks and their dataloader workers all get SIGTERM
    # ...and a step with no validation after it (step 8 or 9)
    check_preempted_then_resumed(tmp_path, synthetic_data, devices=2, workers=1, whole_group=True, after_step=7)


@pytest.mark.slow
def test_sigterm_at_the_last_step_of_an_epoch_resumes_exactly(tmp_path, synthetic_data):
    # 8 steps an epoch: the checkpoint is written after the epoch's last step, before Lightning ends the epoch
    check_preempted_then_resumed(tmp_path, synthetic_data, devices=1, workers=1, whole_group=False, after_step=7,
                                 extra=("--data.samples_per_epoch", "128"))  # fmt: skip


def _fake_checkpoint(path: Path, step: int, completed: int, loops: bool = True) -> Path:
    state = {"global_step": step, "state_dict": {"w": torch.zeros(2)}}
    if loops:
        state["loops"] = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": completed}}}}
    torch.save(state, path)
    return path


def test_ckpt_path_last_is_the_checkpoint_furthest_into_training_whatever_names_and_times(tmp_path):
    folder, root = tmp_path / "checkpoints", tmp_path
    folder.mkdir()
    before_validation = _fake_checkpoint(folder / "step0000020-cider1.000.ckpt", 20, 19)
    after_validation = _fake_checkpoint(folder / "last.ckpt", 20, 20)  # same step, its validation done
    _fake_checkpoint(root / "hpc_ckpt_216132163391653716647.ckpt", 12, 12)  # a big number, an old step
    _fake_checkpoint(folder / "zz-weights-only.ckpt", 30, 30, loops=False)  # cannot resume training
    (folder / "zzz-truncated.ckpt").write_bytes(after_validation.read_bytes()[:1000])
    (folder / ".preempt.ckpt.123.tmp").write_bytes(b"half a checkpoint")
    past = time.time() - 3600
    os.utime(after_validation, (past, past))  # the oldest file on disk
    assert find_last_checkpoint(str(folder), str(root)) == str(after_validation)
    preempted = _fake_checkpoint(folder / PREEMPTION_CHECKPOINT, 23, 22)
    os.utime(preempted, (past - 10, past - 10))
    assert find_last_checkpoint(str(folder), str(root)) == str(preempted)
    assert before_validation.exists()
