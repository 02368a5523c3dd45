"""capline's benchmarks in one table, each measured against a baseline timed in the same run.

    python tools/bench.py                        # every benchmark at full size
    python tools/bench.py --quick                # under 10 minutes on 2 CPU cores
    python tools/bench.py --quick --json         # the table, then every row as JSON on the last line
    python tools/bench.py --only data overhead   # some of: data peer resume overhead beam cider sampling scst gpu

A row is `{"name", "value", "goal", "ok"}` (and sometimes a `note`): `goal` is a number, or "report" for a figure
without one; `value` and `ok` are null when the row was not measured (no GPU, or the benchmark failed).
Exit status: 0 when every benchmark ran and every measured goal is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tools.benchmarks` when run as a script

from tools.benchmarks import format_table  # noqa: E402

BENCHMARKS = {
    "data": "tools.benchmarks.data",  # training dataloader vs bare PIL decode, raw vs pre-resized shards
    "peer": "tools.benchmarks.peer",  # training dataloader vs open_clip's webdataset pipeline, on every layout
    "resume": "tools.benchmarks.resume",  # loader start-up resuming at 90% vs 10% of a 100k epoch, vs replaying it
    "overhead": "tools.benchmarks.overhead",  # Trainer.fit + CaptionModule vs a bare PyTorch loop
    "beam": "tools.benchmarks.beam",  # batched vs per-image beam search
    "cider": "tools.benchmarks.cider",  # cider_d vs pycocoevalcap
    "sampling": "tools.benchmarks.sampling",  # scheduled sampling vs teacher forcing step time
    "scst": "tools.benchmarks.scst",  # SCST step vs cross-entropy step time, the reward's share
    "gpu": "tools.benchmarks.gpu",  # images/s per GPU and data wait (CUDA only)
}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{load}{gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def run_benchmark(name: str, quick: bool) -> tuple[list[dict], bool]:
    """The rows of one benchmark and whether it ran; one that fails gives one not-measured row naming the error."""
    try:
        rows = importlib.import_module(BENCHMARKS[name]).run(quick=quick)
    except Exception as err:  # noqa: BLE001 -- one broken benchmark must not hide the others' results
        traceback.print_exc()
        note = f"failed: {type(err).__name__}: {err}"
        return [{"name": name, "value": None, "goal": None, "ok": None, "note": note}], False
    for row in rows:
        if row["value"] is not None and not math.isfinite(row["value"]):
            row.update(value=None, ok=None, note=f"non-finite value {row['value']}")
    return rows, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller and fewer repeats: under 10 minutes on 2 cores")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list on the last line")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these benchmarks: {' '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    # Lightning's start-up banners and tips would bury the table (its import sets the level: import it first).
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    print(machine(), flush=True)
    rows, all_ran, started = [], True, time.perf_counter()
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        benchmark_rows, ran = run_benchmark(name, args.quick)
        rows, all_ran = rows + benchmark_rows, all_ran and ran
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(format_table(rows))
    print(f"total: {time.perf_counter() - started:.0f} s{' (--quick)' if args.quick else ''}")
    if args.json:
        keys = ("name", "value", "goal", "ok", "note")
        print(json.dumps([{k: row[k] for k in keys if k in row} for row in rows]))
    return 0 if all_ran and all(row["ok"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
