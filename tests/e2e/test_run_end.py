"""The end of every run is saved, and `--ckpt_path last` says which files it refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_fit import capline, shrunk_demo_args  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ended(tmp_path_factory) -> dict:
    """A run of 18 steps validating at step 12 only: Lightning alone leaves last.ckpt at step 12."""
    tmp_path = tmp_path_factory.mktemp("end")
    home = tmp_path / "wandb-home"
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(home), WANDB_CACHE_DIR=str(home), WANDB_CONFIG_DIR=str(home))
    args = [*shrunk_demo_args(tmp_path, steps=18), "--checkpoint.every_n_train_steps", "null"]
    result = capline("fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"tmp": tmp_path, "folder": tmp_path / "run" / "checkpoints", "args": args, "result": result}


def test_last_checkpoint_holds_the_step_fit_ended_at(ended):
    last = ended["folder"] / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 18
    regular = [p for p in ended["folder"].glob("step*.ckpt")]
    assert [torch.load(p, weights_only=True)["global_step"] for p in regular] == [12]  # one validation, one top-k
    summary = ended["result"].stdout
    assert "fit ended at step 18" in summary
    assert f"last checkpoint: {last} (step 18)" in summary, summary


def test_resuming_the_finished_run_trains_nothing_more(ended):
    result = capline("fit", *ended["args"], "--ckpt_path", "last", cwd=ended["tmp"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fit ended at step 18" in result.stdout


def test_ckpt_path_last_names_each_file_it_refuses(ended, tmp_path):
    folder = tmp_path / "refused"
    folder.mkdir()
    good = (ended["folder"] / "last.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(good[: len(good) // 3])
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "weights.ckpt")

    class RunsCode:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"state_dict": RunsCode()}, folder / "pickled.ckpt")
    args = [*ended["args"], "--checkpoint.dirpath", str(folder), "--ckpt_path", "last"]
    result = capline("fit", *args, cwd=ended["tmp"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "starting a new run" not in result.stderr
    lines = result.stderr.strip().splitlines()
    skips = {line.split(" skips ")[1].split(":")[0]: line for line in lines if " skips " in line}
    assert set(skips) == {str(folder / n) for n in ("truncated.ckpt", "weights.ckpt", "pickled.ckpt")}
    assert "truncated" in skips[str(folder / "truncated.ckpt")]
    assert "weights only" in skips[str(folder / "weights.ckpt")]
    assert "run code" in skips[str(folder / "pickled.ckpt")]
    assert lines[-1].startswith("capline: error: --ckpt_path last found no checkpoint") and "3 refused" in lines[-1]
