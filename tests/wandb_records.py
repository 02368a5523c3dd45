"""Reads what a real offline W&B run wrote to its `run-<id>.wandb` record log (no mock involved)."""

from __future__ import annotations

import json
from pathlib import Path


_FILE_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
_BLOCK = 32768  # the log is written in 32 KiB blocks (the LevelDB log format)
_RECORD_HEADER = 7  # checksum (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    """Reassembles the LevelDB-log records of a `.wandb` file (wandb >= 0.19 has no Python reader)."""
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
            break  # zeros past the last record


def _records(run_file: Path):
    from wandb.proto import wandb_internal_pb2

    for payload in _payloads(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def run_files(save_dir: str | Path) -> list[Path]:
    """Every `run-*.wandb` file under a logger's save_dir, oldest first."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_run(run_file: str | Path) -> dict:
    """Returns {"run_id", "config", "history": [{key: value}, ...]} from one run file."""
    run_id, config, history = None, {}, []
    for record in _records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return {"run_id": run_id, "config": config, "history": history}


def series(run: dict, key: str) -> list:
    """The logged values of one key, in logging order."""
    return [row[key] for row in run["history"] if key in row]
