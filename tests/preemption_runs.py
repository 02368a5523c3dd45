"""Shared by the preemption tests: the shrunken real demo config, the probe's records, checkpoint comparisons."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_PATH = ROOT / "tests" / "e2e"  # preemption_probe.StepProbe lives there


# The demo's model at a fiftieth of its size (56K parameters, about 0.1 s a step on one core): same architecture,
# same recipe, so everything a resume must restore is there, in seconds.
TINY_MODEL = [
    "--model.encoder.init_args.model_kwargs",
    '{"features_only": true, "out_indices": [2], "channels": [8, 16, 32, 64], "stem_width": 8}',
    "--model.decoder.init_args.embed_dim", "16",
    "--model.decoder.init_args.hidden_dim", "32",
    "--model.decoder.init_args.attention_dim", "16",
]  # fmt: skip


def fit_args(run: Path, shards: dict, steps: int, devices: int | None = 1, workers: int = 1, batch: int = 16,
             pace: tuple[float, int] = (0.0, 1)) -> list[str]:  # fmt: skip
    """`capline fit` arguments: the demo config on the session's small shards, a validation every 6 steps.
    `devices=None` leaves devices and strategy to the config (or to the sbatch script); `pace` is the probe's
    (min_step_s, paced_attempts)."""
    placement = [] if devices is None else ["--trainer.devices", str(devices), "--trainer.strategy",
                                            "ddp" if devices > 1 else "auto"]  # fmt: skip
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", shards["train_shards"],
        "--data.val_shards", shards["val_shards"],
        "--data.vocab", shards["vocab"],
        "--data.global_batch_size", str(batch),
        "--data.num_workers", str(workers),
        *placement,
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
        "--checkpoint.every_n_train_steps", "4",  # regular checkpoints between validations too
        "--model.encoder_finetuning.freeze_steps", "4",  # the recipe's phases are part of what must resume
        "--model.encoder_finetuning.warmup_steps", "2",
        "--trainer.callbacks+=preemption_probe.StepProbe", "--trainer.callbacks.out_dir", str(run / "probe"),
        "--trainer.callbacks.min_step_s", str(pace[0]), "--trainer.callbacks.paced_attempts", str(pace[1]),
    ]  # fmt: skip


def run_env(tmp_path: Path, base: dict | None = None) -> dict:
    home = tmp_path / "wandb-home"
    return {**(os.environ if base is None else base), "WANDB_MODE": "offline", "WANDB_DIR": str(home),
            "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{PROBE_PATH}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def probe(run: Path, rank: int = 0) -> list[dict]:
    """What rank `rank` recorded at each step boundary, all attempts in order."""
    path = run / "probe" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def differing_tensors(expected: Path, got: Path) -> list[str]:
    a, b = load(expected)["state_dict"], load(got)["state_dict"]
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def checkpoint_names(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir()}


def wandb_rows(run: Path) -> tuple[set[str], list[dict]]:
    """(run ids, the history rows of every attempt in order) of the offline W&B runs under `run`."""
    from wandb_records import read_run, run_files

    runs = [read_run(f) for f in run_files(run)]
    return {r["run_id"] for r in runs}, [row for r in runs for row in r["history"]]


def _comparable(row: dict) -> dict:
    # what a resumed run must log exactly as the uninterrupted one: not times, not throughput, not artifact paths
    return {k: v for k, v in row.items() if not k.startswith("_") and "per_sec" not in k and "samples" not in k}


def history_differences(straight: Path, preempted: Path) -> list[str]:
    """How the preempted run's W&B history (all attempts, one run) differs from the uninterrupted run's: W&B's
    step must count 0, 1, 2... across attempts, and every row hold the same values."""
    ids, rows = wandb_rows(preempted)
    _, expected = wandb_rows(straight)
    problems = [] if len(ids) == 1 else [f"{len(ids)} W&B run ids: {sorted(ids)}"]
    if [r["_step"] for r in rows] != list(range(len(rows))):
        problems.append(f"W&B steps are not 0..{len(rows) - 1}: {[r['_step'] for r in rows]}")
    if len(rows) != len(expected):
        problems.append(f"{len(rows)} rows, the uninterrupted run logged {len(expected)}")
    for got, want in zip(rows, expected):
        if _comparable(got) != _comparable(want):
            keys = sorted(set(_comparable(got).items()) ^ set(_comparable(want).items()))
            problems.append(f"row {got['_step']} (step {got.get('trainer/global_step')}) differs: {keys[:4]}")
    return problems
