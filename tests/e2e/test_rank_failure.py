"""A DDP rank that dies (SIGKILL, as the out-of-memory killer sends it; or an exception) under Lightning's own
launcher (2 CPU processes, gloo): the run ends in bounded time with one line naming the rank and the command that
resumes, every checkpoint written before stays loadable, and that command resumes exactly."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from preemption_runs import differing_tensors, fit_args, load, probe, run_env  # noqa: E402

from capline.checkpoints import read_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 12


def child_rank_pid(parent: int, local_rank: int) -> int | None:
    """The PID of the child process Lightning started for `local_rank` (read from its environment)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


def group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def straight_run(tmp_path: Path, shards: dict, env: dict) -> Path:
    run = tmp_path / "straight"
    done = subprocess.run([CAPLINE, "fit", *fit_args(run, shards, STEPS, devices=2)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def check_line(stderr: str, how: str) -> list[str]:
    """The one line about the dead rank; returns the resume command it prints, checking the checkpoint it names."""
    lines = [line for line in stderr.splitlines() if line.startswith("capline: rank 1 (PID ")]
    assert len(lines) == 1 and how in lines[0], stderr[-3000:]
    assert "Forcefully terminating" not in stderr  # Lightning's line: capline's says more
    command, taken = lines[0].split("Resume with: ")[1].rsplit(" (it takes ", 1)
    path, step = taken.rstrip(")").rsplit(" (step ", 1)
    assert read_checkpoint(path)["global_step"] == int(step) >= 4  # loadable, and at the step the line names
    argv = shlex.split(command)
    assert argv[:2] == ["capline", "fit"] and argv[-2:] == ["--ckpt_path", "last"]
    return argv


def resume_exactly(argv: list[str], env: dict, straight: Path, run: Path) -> None:
    resumed = subprocess.run([CAPLINE, *argv[1:]], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    different = differing_tensors(straight / "checkpoints/last.ckpt", run / "checkpoints/last.ckpt")
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"


def test_a_rank_killed_by_sigkill_ends_the_run_in_one_line_and_resumes_exactly(tmp_path, synthetic_data):
    env = run_env(tmp_path)
    straight = straight_run(tmp_path, synthetic_data, env)
    run = tmp_path / "killed"
    args = fit_args(run, synthetic_data, STEPS, devices=2, pace=(0.4, 1))
    err = tmp_path / "killed.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([CAPLINE, "fit", *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)  # fmt: skip
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not any(r["step"] >= 8 for r in probe(run, 1)):
            time.sleep(0.1)
        victim = child_rank_pid(proc.pid, 1)
        assert proc.poll() is None and victim is not None, err.read_text()[-3000:]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=60)
        assert group_gone_within(proc.pid, 30), "processes of the run are still alive"
        gone = time.monotonic() - killed
    print(f"\nrank 1 SIGKILLed: every process gone {gone:.1f} s later, rank 0's exit code {code}")
    assert code != 0 and gone < 15
    argv = check_line(err.read_text(), f"(PID {victim}) was killed by SIGKILL")
    resume_exactly(argv, env, straight, run)


def test_a_rank_that_raises_ends_the_run_in_one_line_and_resumes_exactly(tmp_path, synthetic_data):
    env = run_env(tmp_path)
    straight = straight_run(tmp_path, synthetic_data, env)
    run = tmp_path / "raised"
    args = fit_args(run, synthetic_data, STEPS, devices=2)
    inject = ["--trainer.callbacks+=preemption_probe.FailOnRank", "--trainer.callbacks.rank", "1",
              "--trainer.callbacks.step", "7"]  # fmt: skip
    started = time.monotonic()
    failed = subprocess.run([CAPLINE, "fit", *args, *inject], env=env, capture_output=True, text=True, timeout=300)
    print(f"\nrank 1 raised at step 7: the run ended {time.monotonic() - started:.1f} s after it started")
    assert failed.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 7" in failed.stderr  # the rank's own error stays
    assert failed.stderr.count("Traceback") == 1  # rank 1's; rank 0's broken collective is the line below
    argv = check_line(failed.stderr, "exited with code 1 (its error is printed above)")
    assert argv[2:-2] == [*args, *inject]
    resume_exactly(["capline", "fit", *args, "--ckpt_path", "last"], env, straight, run)  # the failure fixed
