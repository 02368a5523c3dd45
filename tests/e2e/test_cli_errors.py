"""Config mistakes fail fast: one sentence naming the bad value, exit code 2, no traceback, before training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run_fit(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [CAPLINE, "fit", "--config", str(ROOT / "configs/demo.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "run"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "run"), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return result, time.perf_counter() - start


def assert_fails_fast(result: subprocess.CompletedProcess, elapsed: float, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("capline: error:"), result.stderr[-2000:]
    for word in words:
        assert word in message, message
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not (Path(result.args[result.args.index("--trainer.default_root_dir") + 1]) / "checkpoints").exists()


@pytest.fixture
def vocab_and_shards(synthetic_data) -> list[str]:
    return ["--data.synthetic", "null", "--data.vocab", synthetic_data["vocab"],
            "--data.train_shards", synthetic_data["train_shards"],
            "--data.val_shards", synthetic_data["val_shards"], "--data.samples_per_epoch", "256"]  # fmt: skip


def test_shard_pattern_matching_nothing(tmp_path, vocab_and_shards):
    pattern = str(tmp_path / "missing-{000000..000009}.tar")
    result, elapsed = run_fit(tmp_path, *vocab_and_shards, "--data.train_shards", pattern)
    assert_fails_fast(result, elapsed, "data.train_shards", pattern, "matches no file")


def test_unknown_timm_model(tmp_path, vocab_and_shards):
    result, elapsed = run_fit(tmp_path, *vocab_and_shards, "--model.encoder.init_args.model_name", "resnet181")
    assert_fails_fast(result, elapsed, "unknown timm model", "resnet181", "resnet18")


def test_missing_vocab_file(tmp_path, vocab_and_shards):
    missing = str(tmp_path / "nope.json")
    result, elapsed = run_fit(tmp_path, *vocab_and_shards, "--data.vocab", missing)
    assert_fails_fast(result, elapsed, missing, "does not exist")


def test_malformed_vocab_file(tmp_path, vocab_and_shards):
    bad = tmp_path / "vocab.json"
    bad.write_text(json.dumps({"words": ["a", "b"]}))
    result, elapsed = run_fit(tmp_path, *vocab_and_shards, "--data.vocab", str(bad))
    assert_fails_fast(result, elapsed, str(bad), "malformed")
