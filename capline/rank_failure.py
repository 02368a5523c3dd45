"""A DDP rank that dies ends the run with one line: which rank, how, and the command that resumes.

Lightning's launcher (`trainer.devices` > 1 without torchrun or SLURM) starts ranks 1..N-1 as child processes of
rank 0 and watches them: when one exits with an error (the kernel's out-of-memory killer sends SIGKILL; an exception
exits with 1), it SIGKILLs every process, rank 0 included, after printing the child's PID. Nothing said which rank
it was or how to go on. Here the watcher looks every second (Lightning's looks every 5) and says, before the group is
stopped, what died and which checkpoint `--ckpt_path last` would resume from; every checkpoint written before stays
as it was (saves are atomic: `capline.checkpoints.AtomicCheckpointIO`).
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time

from lightning.fabric.strategies.launchers import subprocess_script

_resume: dict | None = None  # what the line needs: the command's arguments, the checkpoint folder, the run's root
_observer: ReportingChildObserver | None = None  # the watcher of this process's child ranks, once it runs
_reported = False
_reporting = threading.Lock()  # the observer thread waits for a line the main thread is writing before it kills all


def describe_exit(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = " (the kernel's out-of-memory killer sends it: see `dmesg`)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {code} (its error is printed above)"


def resume_command(argv: list[str]) -> str:
    """`capline <argv>` with `--ckpt_path last` in place of any `--ckpt_path` it had."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["capline", *kept, "--ckpt_path", "last"])


def resume_advice() -> str:
    """`<command> (it takes <checkpoint> (step N))`: how the running `fit` resumes, or "" outside one."""
    if _resume is None:
        return ""
    from capline.checkpoints import training_position
    from capline.preflight import find_last_checkpoint

    found = find_last_checkpoint(_resume["dirpath"], _resume["root"])
    taken = f"it takes {found} (step {training_position(found)[0]})" if found else "no checkpoint yet: it starts over"
    return f"{resume_command(_resume['argv'])} ({taken})"


def report_line(rank: int, pid: int, code: int) -> str:
    """The one line printed when rank `rank` (process `pid`) ended with return code `code`."""
    line = f"capline: rank {rank} (PID {pid}) {describe_exit(code)}; every other rank was stopped."
    advice = resume_advice()
    return f"{line} Resume with: {advice}" if advice else line


class ReportingChildObserver(subprocess_script._ChildProcessObserver):
    """Lightning's watcher of the child ranks, which says which rank died and how to resume before it stops all."""

    def __init__(self, main_pid: int, child_processes: list, sleep_period: int = 1) -> None:
        global _observer
        super().__init__(main_pid=main_pid, child_processes=child_processes, sleep_period=sleep_period)
        _observer = self

    def _terminate_all(self) -> None:
        failed = next(((i + 1, p) for i, p in enumerate(self._child_processes) if p.returncode), None)
        if failed is not None:
            report(*failed)
        super()._terminate_all()


def report(rank: int, process) -> None:
    """Prints the line about a child rank that ended, once: from rank 0's main thread (its collective broke) or from
    the observer thread (which then stops every process), whichever comes first; the other waits until it is out."""
    global _reported
    with _reporting:
        if not _reported:
            _reported = True
            print(report_line(rank, process.pid, process.returncode), file=sys.stderr, flush=True)


def failed_child_behind(err: BaseException, wait_s: float = 3.0) -> tuple[int, object] | None:
    """(rank, process) of the child rank whose end made rank 0's collective fail with `err`, if that is what
    happened: a communication error while a child has exited with an error (it may take a moment to be reaped)."""
    text = f"{type(err).__name__}: {err}".lower()
    if _observer is None or not any(word in text for word in ("gloo", "nccl", "connection", "distbackend", "peer")):
        return None
    deadline = time.monotonic() + wait_s
    while True:
        for i, process in enumerate(_observer._child_processes):
            if process.poll() not in (None, 0):
                return i + 1, process
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def install(argv: list[str], dirpath: str, root: str) -> None:
    """Makes Lightning's launcher use `ReportingChildObserver` for this run (called by the CLI before `fit`)."""
    global _resume
    _resume = {"argv": list(argv), "dirpath": dirpath, "root": root}
    subprocess_script._ChildProcessObserver = ReportingChildObserver
    # Lightning's own line ("Child process with PID ... terminated with code -9 ...") says less than capline's
    logging.getLogger(subprocess_script.__name__).addFilter(
        lambda record: "Forcefully terminating all other processes" not in str(record.msg)
    )
