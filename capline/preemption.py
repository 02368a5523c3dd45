"""Preemption: SIGTERM, or SLURM's requeue signal, becomes one checkpoint at the next step boundary.

A signal handler only records which signal came (it may land mid-backward, mid-optimizer step or mid-save; Lightning
#21406). The main process of every rank acts at the next step boundary, after the optimizer step (after the
validation, when one follows that step): the ranks agree on a step through an all-reduce (max) of their flags and
global rank 0 writes `preempt.ckpt` in the checkpoint folder (atomically, replacing the previous one; the name
holds no number, so no numbering can read it). Once Lightning has logged that step (and its epoch's end, if it
ended one), as the next batch starts, W&B is finished and its service stopped, and then

- after SLURM's requeue signal (`SIGUSR1`, from `#SBATCH --signal=SIGUSR1@90`): the job is requeued once
  (`scontrol requeue $SLURM_JOB_ID`, by global rank 0) and every rank exits with `EXIT_PREEMPTED`;
- after `SIGTERM` (Kubernetes, torchrun elastic, `scancel`, SLURM without `--signal`): every rank exits with
  `EXIT_PREEMPTED` (75, `EX_TEMPFAIL`: "try again later").

Either way global rank 0 prints one line (`capline: preempted: checkpoint at step N written to ... X s after
SIGTERM; ...`) and no rank prints a traceback. Checkpoints also carry the logged values (`callback_metrics`), which
Lightning does not restore: a resumed run's checkpoints between validations see the same monitored value.

`capline fit --ckpt_path last` then resumes from the newest checkpoint by recorded global step. Processes forked
while the handlers are installed (dataloader workers) ignore and block both signals: SLURM signals every process
of a job step, and a forked worker would otherwise act on its own stale copy of the trainer, or die. Only their
parent's SIGTERM (how PyTorch ends a worker that does not stop by itself) still ends them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the caller is invited to retry
PREEMPTION_CHECKPOINT = "preempt.ckpt"
_STOP, _REQUEUE = 1, 2  # what a rank's flag asks for; the all-reduce takes the max, so a requeue wins

# The first signal this process received: (signal number, time.monotonic() when it came), or None.
_received: tuple[int, float] | None = None
_previous: dict[int, object] = {}  # handlers in place before the first install, put back by restore_signal_handlers
_main_pid: int | None = None


class Preempted(SystemExit):
    """Raised by every rank after the preemption checkpoint is written: Python exits with `code` and no traceback."""


def install_signal_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Makes `signals` set the preemption flag in this process and be ignored by processes it forks from now on.

    Safe to call again (Lightning replaces the SIGTERM handler when `fit` starts; the callback puts this one back).
    """
    global _main_pid
    if _main_pid is None:
        os.register_at_fork(after_in_child=_ignore_in_forked_child)
    _main_pid = os.getpid()
    for signum in signals:
        previous = signal.signal(signum, _record_signal)
        signal.siginterrupt(signum, False)  # restart system calls (sockets of a collective) instead of failing them
        _previous.setdefault(signum, previous)


def restore_signal_handlers() -> None:
    """Puts back the handlers that were in place before `install_signal_handlers` (at the normal end of `fit`)."""
    global _received
    for signum, previous in _previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _previous.clear()
    _received = None


def received_signal() -> tuple[int, float] | None:
    """(signal number, monotonic time) of the first signal received since the handlers were installed, or None."""
    return _received


def _record_signal(signum: int, frame) -> None:
    global _received
    if os.getpid() != _main_pid:  # a child forked in the instant before its at-fork hook ran
        return
    if _received is None:
        _received = (signum, time.monotonic())


def _ignore_in_forked_child() -> None:
    global _received
    if _main_pid is None or os.getpid() == _main_pid or not _previous:
        return
    _received = None
    for signum in _previous:
        signal.signal(signum, signal.SIG_IGN)
    # ...and blocked: a PyTorch dataloader worker then installs its own SIGTERM handler (which kills the worker
    # on a SIGTERM not sent by its parent); a blocked signal is never delivered, whatever the handler. Every
    # thread of the child inherits the mask; one of them takes the blocked signals and honours only the
    # parent's SIGTERM (how `_shutdown_workers` ends a worker that does not stop by itself), as PyTorch does.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(_previous))
    threading.Thread(target=_exit_on_parents_sigterm, args=(set(_previous),), daemon=True).start()


def _exit_on_parents_sigterm(signals: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
            os._exit(0)


class Preemption(Checkpoint):
    """Turns a preemption signal into one checkpoint at the next step boundary, then a requeue or a clean exit.

    A `Checkpoint` so that Lightning runs it after `ModelCheckpoint` at each hook: the regular checkpoints of the
    step at which the run stops are written first, exactly as in a run that is never interrupted.

    Args:
        filename: Name of the preemption checkpoint in the `ModelCheckpoint`'s folder.
        requeue_signal: The signal that means "requeue me" under SLURM (what `#SBATCH --signal` sends).
        exit_code: Exit status of every rank after the checkpoint.
    """

    def __init__(self, filename: str = PREEMPTION_CHECKPOINT, requeue_signal: str = "SIGUSR1",
                 exit_code: int = EXIT_PREEMPTED):  # fmt: skip
        self.filename = filename
        self.requeue_signal = signal.Signals[requeue_signal]
        self.exit_code = exit_code
        self._restored_metrics: dict = {}  # the logged values a resumed checkpoint held, until training starts
        self._pending: tuple | None = None  # the preemption checkpoint written, until the step's logs are out

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            install_signal_handlers((signal.SIGTERM, self.requeue_signal))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Lightning restores no logged value: a resumed run's checkpoints between two validations would not see
        # the monitored metric (no top-k entry, another file name) where the uninterrupted run saw the last one.
        checkpoint["callback_metrics"] = {k: v.detach().cpu().clone() for k, v in trainer.callback_metrics.items()
                                          if isinstance(v, torch.Tensor)}  # fmt: skip

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._restored_metrics = checkpoint.get("callback_metrics", {})

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's own SIGTERM handler (installed as fit starts) forwards the signal and broadcasts inside the
        # handler; this one only records it.
        install_signal_handlers((signal.SIGTERM, self.requeue_signal))
        restored, self._restored_metrics = self._restored_metrics, {}
        trainer.callback_metrics.update({k: v.to(pl_module.device) for k, v in restored.items()})

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # fit ended normally (a preempted one exits with the handlers in place)
            restore_signal_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not _validation_follows(trainer):  # otherwise on_validation_end decides, once validation is done
            self._pending = self._checkpoint_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._pending = self._checkpoint_if_signalled(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # Lightning logs a step's training metrics after on_train_batch_end and an epoch's at its end: the run
        # stops once they are logged, so that the W&B history holds every row of the run that never stopped.
        if self._pending is not None:
            self._exit(trainer, *self._pending)

    def checkpoint_path(self, trainer) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or os.path.join(trainer.default_root_dir, "checkpoints")) / self.filename

    def _checkpoint_if_signalled(self, trainer) -> tuple[Path, int, str] | None:
        """Where every rank agrees to stop: writes the preemption checkpoint, returns (path, what the ranks asked
        for, how long after the signal it was written)."""
        got = received_signal()
        wish = 0 if got is None else _REQUEUE if got[0] == self.requeue_signal and _slurm_job_id() else _STOP
        if trainer.world_size > 1:  # every rank takes part, every step: all stop at the same one
            flag = torch.tensor([wish], device=trainer.strategy.root_device)
            wish = int(trainer.strategy.reduce(flag, reduce_op="max").item())
            # A signal that arrived while this rank waited in the collective is handled only once it returns.
            got = received_signal()
        if not wish or trainer.global_step >= (trainer.max_steps if trainer.max_steps >= 0 else float("inf")):
            return None  # nothing asked, or the run is finishing anyway
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # rank 0 writes it; every rank waits for the write
        reason = signal.Signals(got[0]).name if got else "another rank's signal"
        return path, wish, f"{time.monotonic() - got[1]:.1f} s after {reason}" if got else f"after {reason}"

    def _exit(self, trainer, path: Path, wish: int, written: str) -> None:
        if trainer.is_global_zero:
            _finish_loggers(trainer)
            action = _requeue() if wish == _REQUEUE else "resume with --ckpt_path last"
            print(f"capline: preempted: checkpoint at step {trainer.global_step} written to {path} {written}; "
                  f"{action}; exiting with code {self.exit_code}", file=sys.stderr, flush=True)  # fmt: skip
        raise Preempted(self.exit_code)


def _validation_follows(trainer) -> bool:
    """Whether Lightning validates right after this training batch (it would at this point in `on_advance_end`)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return not loop._skip_next_val and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    except AttributeError:  # another Lightning version: act now, before any validation of this step
        return False


def _finish_loggers(trainer) -> None:
    """Flushes every logger and ends the W&B run, so that the next attempt continues it (same id, `resume`)."""
    for logger in trainer.loggers:
        logger.finalize("preempted")
        run = getattr(logger, "_experiment", None)  # W&B: the run, if it was ever started
        if run is not None and callable(getattr(run, "mark_preempting", None)):
            run.mark_preempting()  # shown as "preempted", not "crashed"
            run.finish()
    wandb = sys.modules.get("wandb")
    if wandb is not None and callable(getattr(wandb, "teardown", None)):
        # ...and stops W&B's service process now: a requeue makes SLURM terminate every process of the job, that
        # one included, and W&B's own exit hook would then fail with a ConnectionResetError traceback
        wandb.teardown()


def _slurm_job_id() -> str | None:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def _requeue() -> str:
    """`scontrol requeue` of this job, once; returns what happened, for the exit line."""
    job = _slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"capline: could not requeue SLURM job {job}: {err}")
        return f"requeueing SLURM job {job} failed ({err}): resubmit it"
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        return f"requeueing SLURM job {job} failed ({message}): resubmit it"
    return f"requeued SLURM job {job}"
