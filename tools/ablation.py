"""The recipe ablation on the demo data: each row is one `capline fit` of configs/demo.yaml with the same steps.

    python tools/ablation.py [--steps 700] [--out runs/ablation] [--only NAME ...]

Prints a Markdown table of the final `val/cider`, `val/cider_shuffled`, `val/unique_captions` and whether the
captions are true: `val/scene_accuracy`, `val/objects_correct`, `val/relation_correct`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from capline.loggers import read_wandb_run

ROOT = Path(__file__).resolve().parents[1]
SHOW_TELL = ["--model.decoder.class_path", "capline.models.ShowTellDecoder",
             "--model.decoder.init_args.embed_dim", "256", "--model.decoder.init_args.hidden_dim", "256"]  # fmt: skip
NO_SAMPLING = ["--model.scheduled_sampling.schedule", "none"]
PREVIOUS_QUERY = ["--model.decoder.init_args.query", "previous"]  # Xu et al.: h_{t-1} chooses where word t looks
PLAIN_ATTENTION = PREVIOUS_QUERY + [
    "--model.decoder.init_args.positions", "false", "--model.decoder.init_args.init_layout", "0",
]  # fmt: skip
ROWS = {
    "show_tell_frozen_cnn": SHOW_TELL + NO_SAMPLING + ["--model.encoder_finetuning.freeze_steps", "-1"],
    "show_tell_warmup_finetune": SHOW_TELL + NO_SAMPLING,
    "show_tell_warmup_finetune_ss": SHOW_TELL,
    "attention_xu_warmup_finetune_ss": PLAIN_ATTENTION,  # Xu et al.'s decoder: mean-feature start, no positions
    "attention_positions_layout_previous_query": PREVIOUS_QUERY,
    "attention_positions_layout_current_query_no_ss": NO_SAMPLING,
    "attention_positions_layout_current_query_warmup_finetune_ss": [],  # the demo config as shipped
}


METRICS = ("val/cider", "val/cider_shuffled", "val/unique_captions", "val/scene_accuracy", "val/objects_correct",
           "val/relation_correct")  # fmt: skip


def run_row(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    run_dir = out / name
    args = [
        sys.executable, "-m", "capline", "fit", "--config", str(ROOT / "configs/demo.yaml"), *overrides,
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    minutes = (time.perf_counter() - start) / 60
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
    run_file = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))[-1]
    history = read_wandb_run(run_file)["history"]
    values = {k: [row[k] for row in history if k in row] for k in METRICS}
    return {"name": name, "minutes": minutes, **{k: v[-1] for k, v in values.items() if v}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)  # the demo's max_steps
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--only", nargs="*", default=list(ROWS))
    args = parser.parse_args()
    rows = [run_row(name, ROWS[name], args.steps, Path(args.out)) for name in args.only]
    print(f"| run ({args.steps} steps) | " + " | ".join(m.removeprefix("val/") for m in METRICS) + " | minutes |")
    print("| --- " * (len(METRICS) + 2) + "|")
    for r in rows:
        cells = " | ".join(f"{r[m]:.3f}" if m in r else "" for m in METRICS)
        print(f"| {r['name']} | {cells} | {r['minutes']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
