"""The real `tools/slurm/train.sbatch` on a real one-node SLURM (munged + slurmctld + slurmd started here), with a
two-minute time limit: SLURM's own clock sends `SIGUSR1` (`--signal=SIGUSR1@60`), capline checkpoints at the next
step boundary and requeues the job, at least twice; the job ends exactly where a run never stopped ends.

Needs root and Debian's `slurm-wlm` + `munge` (`.ci/run` installs them); elsewhere the test skips with the reason,
and under `.ci/run` (CAPLINE_CI=1) a missing SLURM fails it instead.

How many steps an attempt makes before SLURM's signal depends on the machine, so the first two attempts are paced
(the test's probe makes each step last PACE_S): they cannot reach STEPS, and the third attempt runs at full speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from preemption_runs import (  # noqa: E402
    ROOT,
    TINY_MODEL,
    checkpoint_names,
    differing_tensors,
    fit_args,
    history_differences,
    load,
    probe,
    run_env,
    wandb_rows,
)
from slurm_cluster import SlurmCluster, SlurmUnavailable, unavailable_reason  # noqa: E402
from wandb_records import run_files  # noqa: E402

from capline.preemption import EXIT_PREEMPTED, PREEMPTION_CHECKPOINT  # noqa: E402

TIME_LIMIT, SIGNAL_AT = "00:02:00", 60  # SLURM signals 30 to 60 s after an attempt starts (its checks are 30 s apart)
PACE_S, PACED_ATTEMPTS = 1.5, 2  # at most 60 / 1.5 = 40 steps in each of the first two attempts...
STEPS = 100  # ...so at least two requeues; the rest takes seconds at full speed
EXTRA = [*TINY_MODEL, "--data.global_batch_size", "8", "--model.scheduled_sampling.start_step", "30"]  # 64 steps an
# epoch, so the job crosses an epoch boundary; scheduled sampling draws random numbers, which must resume too


@pytest.fixture(scope="module")
def slurm():
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CAPLINE_CI"):
            pytest.fail(f"SLURM tests must run in CI: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="capline-slurm-", dir="/tmp"))  # munge must reach it: not tmp_path
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except SlurmUnavailable as err:
        cluster.stop()
        pytest.fail(f"the SLURM test cluster did not start: {err}")
    yield cluster
    cluster.stop()


def job_field(cluster: SlurmCluster, job: str, field: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", job], env=cluster.env(), capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else None


def attempt_times(text: str) -> list[tuple[int, str, float]]:
    """(attempt, "on" or "ended", POSIX time) of every line the sbatch script wrote about an attempt."""
    found = re.findall(r"=== capline: job \d+ attempt (\d+) (on|ended).* at (\S+)$", text, flags=re.M)
    return [(int(a), what, datetime.fromisoformat(at).timestamp()) for a, what, at in found]


@pytest.mark.slow
def test_sbatch_requeued_by_the_time_limit_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, synthetic_data, slurm):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    reference: dict = {}  # the uninterrupted run, alongside the job (at full speed: its step times do not matter)
    thread = threading.Thread(target=lambda: reference.update(result=subprocess.run(
        [CAPLINE, "fit", *fit_args(straight, synthetic_data, STEPS), *EXTRA],
        env=run_env(tmp_path), capture_output=True, text=True, timeout=600)))  # fmt: skip
    thread.start()

    env = run_env(tmp_path, slurm.env())
    env["PATH"] = f"{Path(CAPLINE).parent}{os.pathsep}{env['PATH']}"  # srun finds `capline` as a user's job would
    log = tmp_path / "slurm.out"
    args = fit_args(preempted, synthetic_data, STEPS, devices=None, pace=(PACE_S, PACED_ATTEMPTS))[2:]
    submitted = time.monotonic()
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--time={TIME_LIMIT}", f"--signal=SIGUSR1@{SIGNAL_AT}", "--cpus-per-task=1",
         f"--output={log}", f"--chdir={ROOT}", str(ROOT / "tools/slurm/train.sbatch"), "configs/demo.yaml", *args,
         *EXTRA],
        env=env, capture_output=True, text=True, check=True)  # fmt: skip
    job = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 480
    while job_field(slurm, job, "JobState") not in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", None):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=slurm.env())
            pytest.fail(f"job {job} did not end within 8 minutes: {log.read_text()[-4000:]}")
        time.sleep(1)
    job_s = time.monotonic() - submitted
    thread.join()

    text = log.read_text()
    assert job_field(slurm, job, "JobState") == "COMPLETED", text[-4000:]
    restarts = int(job_field(slurm, job, "Restarts"))
    assert restarts >= 2, text[-4000:]
    assert reference["result"].returncode == 0, reference["result"].stderr[-3000:]
    # final step, weights, checkpoint files: the regular ones of the uninterrupted run and one preemption checkpoint
    assert load(preempted / "checkpoints/last.ckpt")["global_step"] == STEPS
    different = differing_tensors(straight / "checkpoints/last.ckpt", preempted / "checkpoints/last.ckpt")
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert checkpoint_names(preempted) == checkpoint_names(straight) | {PREEMPTION_CHECKPOINT}
    assert not list(preempted.rglob("hpc_ckpt_*")) and not list(preempted.rglob("*.tmp"))
    # the log of every attempt, each preemption said once (by SLURM's signal), no traceback
    attempts = [a for a, what, _ in attempt_times(text) if what == "on"]
    assert attempts == list(range(1, restarts + 2)), text[-4000:]
    preemptions = re.findall(r"capline: preempted: checkpoint at step (\d+) .* ([0-9.]+) s after SIGUSR1; requeued "
                             rf"SLURM job {job}; exiting with code {EXIT_PREEMPTED}", text)  # fmt: skip
    assert len(preemptions) == restarts, text[-4000:]
    assert "Traceback" not in text and not re.search(r"\w+Error\b", text), text[-4000:]
    # one W&B run, its steps counting on across the attempts, every row as the uninterrupted run logged it
    ids, rows = wandb_rows(preempted)
    assert len(ids) == 1 and len(run_files(preempted)) == restarts + 1
    assert not history_differences(straight, preempted), history_differences(straight, preempted)[:5]
    report(job, text, preemptions, probe(preempted), job_s)


def report(job: str, text: str, preemptions: list, records: list[dict], job_s: float) -> None:
    """Prints, for each requeue: the step, signal to checkpoint, and what the requeue cost in training time."""
    starts = {a: t for a, what, t in attempt_times(text) if what == "on"}
    print(f"\nSLURM job {job}: {len(starts)} attempts, {job_s:.0f} s from sbatch to COMPLETED")
    for attempt, (step, written_s) in enumerate(preemptions, start=1):
        step = int(step)
        stop = max(r["time"] for r in records if r["step"] == step)  # the boundary at which the attempt stopped
        resumed = min(r["time"] for r in records if r["step"] == step + 1 and r["time"] > stop)
        print(f"  attempt {attempt} preempted at step {step}: checkpoint {float(written_s):.1f} s after SIGUSR1; "
              f"requeue cycle (last step of attempt {attempt} to first new step of attempt {attempt + 1}) "
              f"{resumed - stop:.1f} s, of which the next attempt's start to its first step "
              f"{resumed - starts[attempt + 1]:.1f} s")  # fmt: skip
