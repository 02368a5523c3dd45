"""W&B logging whose step is the trainer's global step, and a reader for W&B's offline run files.

A job killed after its last checkpoint has already logged steps that the resumed job trains again. With the
W&B step equal to the global step, the resumed job skips what its run already holds, so the run's steps never
go back, online (W&B reports the run's step on resume) and offline (read from the local run files).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from capline.errors import first_line

log = logging.getLogger(__name__)

_FILE_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
_BLOCK = 32768  # the log is written in 32 KiB blocks (the LevelDB log format)
_RECORD_HEADER = 7  # checksum (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbLogger(_LightningWandbLogger):
    """Lightning's `WandbLogger`, made safe for resuming a killed job.

    Rows whose `trainer/global_step` an earlier job of the same run already logged are dropped (the resumed job
    trains those steps again), and W&B's own step continues after the earlier job's last one, offline too (read
    from the local run files) where W&B itself would start again at 0. Takes the same arguments; the CLI sets
    `id` and `resume="allow"` when resuming from a checkpoint. `save_dir` (where `wandb/` is made) defaults to None,
    which the capline CLI replaces by `trainer.default_root_dir`.
    """

    def __init__(self, *args, save_dir: str | None = None, **kwargs):
        mode = os.environ.get("WANDB_MODE")
        if mode:  # the environment wins over the config's `offline`, as W&B users expect
            kwargs["offline"] = mode in ("offline", "dryrun")
        super().__init__(*args, save_dir=save_dir, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb >= 0.22 warns that it ignores the setting, even unset
            del self._wandb_init["anonymous"]
        self._quieted = False
        self.failed: Exception | None = None  # what stopped W&B's logging (a full disk...), if anything did
        self._replayed_up_to: int | None = None  # last trainer step an earlier job logged
        self._wandb_step = 0

    @property
    def experiment(self):
        run = _LightningWandbLogger.experiment.fget(self)
        if not self._quieted:
            self._quieted = True
            # W&B's own debug logs live in the run folder: when its disk fills, Python's logging would print a
            # traceback for every record they fail to write (capline says what happened once, in _stop_logging)
            for handler in _wandb_file_handlers():
                handler.handleError = lambda record: None
        return run

    def _resume_point(self) -> int:
        if self._replayed_up_to is None:
            run = self.experiment
            rows = [row for f in offline_run_files(self.save_dir, run.id) for row in read_wandb_run(f)["history"]]
            rows.append(dict(run.summary))  # online, a resumed run's summary holds its last logged values
            self._replayed_up_to = int(max([-1, *(row.get("trainer/global_step", -1) for row in rows)]))
            self._wandb_step = max([run.step, *(row["_step"] + 1 for row in rows if "_step" in row)])
        return self._replayed_up_to

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.failed is not None:
            return None
        try:
            if step is None:
                return super().log_metrics(metrics, step)
            if step <= self._resume_point():
                return None  # logged by the job that was killed after its last checkpoint
            self.experiment.log(dict(metrics, **{"trainer/global_step": step}), step=self._wandb_step)
            self._wandb_step += 1
        except Exception as err:
            if not _is_wandb_failure(err):
                raise
            self._stop_logging(err, step)
        return None

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        if self.failed is None:
            try:
                super().log_hyperparams(params)
            except Exception as err:
                if not _is_wandb_failure(err):
                    raise
                self._stop_logging(err, None)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self.failed is None:
            super().finalize(status)

    def _stop_logging(self, err: Exception, step: int | None) -> None:
        """W&B could not write (a full disk, its service gone): training goes on without it, said once."""
        self.failed = err
        where = self.save_dir or "."
        at = f" at step {step}" if step is not None else ""
        log.warning(
            "W&B stopped logging%s: %s (its files are in %s/wandb); training goes on, and the checkpoints hold "
            "everything needed to resume", at, first_line(err, 200), where,
        )  # fmt: skip
        logging.getLogger("wandb").setLevel(logging.CRITICAL)  # its own log files are on the same failed disk


def _is_wandb_failure(err: Exception) -> bool:
    """An error of W&B's writing or of its service, not of what was logged."""
    return isinstance(err, (OSError, ConnectionError)) or type(err).__module__.startswith("wandb")


def _wandb_file_handlers() -> list[logging.FileHandler]:
    """The handlers writing W&B's own debug logs (in the run folder)."""
    loggers = [logging.getLogger(name) for name in ("wandb", "wandb.sdk")]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.FileHandler)]


def offline_run_files(save_dir: str | None, run_id: str) -> list[Path]:
    """The `.wandb` files of earlier offline runs with this id under `save_dir`."""
    if not save_dir:
        return []
    return sorted(Path(save_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def _payloads(data: bytes):
    """Reassembles the LevelDB-log records of a `.wandb` file (wandb >= 0.19 ships no Python reader)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:  # the block's tail is zero padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            return  # zeros after the last record (a file cut short by a kill)


def read_wandb_run(run_file: str | Path) -> dict:
    """Returns {"run_id", "config", "history": [{key: value}, ...]} from a W&B run file."""
    from wandb.proto import wandb_internal_pb2

    run_id, config, history = None, {}, []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # a record cut by a kill: the rest of the file holds nothing more
            break
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return {"run_id": run_id, "config": config, "history": history}
