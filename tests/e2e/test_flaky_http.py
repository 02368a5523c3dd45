"""Shards over HTTP from a real server on 127.0.0.1 that drops connections mid-tar, answers 503 and stalls
(`tests/flaky_server.py`): the real `capline fit` trains and validates on, resuming each broken read where it
broke, validation scores every image once, and a shard that never comes is counted and named, not waited on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402
from preemption_runs import run_env, wandb_rows  # noqa: E402

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parents[1]


def serve(folder: Path, plan: dict, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, str(HERE / "flaky_server.py"), str(folder), str(tmp_path / "plan.json"),
                               str(port_file)])  # fmt: skip
    deadline = time.time() + 30
    while not port_file.exists() or not port_file.read_text():
        assert time.time() < deadline and server.poll() is None, "the test server did not start"
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port_file.read_text()}"


def fit_over_http(tmp_path: Path, data: dict, base: str, extra: list[str]) -> subprocess.CompletedProcess:
    run = tmp_path / "run"
    folder = Path(data["train_shards"]).parent
    remote = lambda pattern: f"{base}/{Path(pattern).relative_to(folder)}"  # noqa: E731
    args = [
        "--config", str(HERE.parent / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", remote(data["train_shards"]),
        "--data.val_shards", remote(data["val_shards"]),
        "--data.vocab", data["vocab"],
        "--data.samples_per_epoch", "96",  # remote shards are not counted: 6 batches of 16 per epoch
        "--data.global_batch_size", "16",
        "--data.num_workers", "1",
        "--data.http.backoff_s", "0.2",
        "--data.http.stall_s", "2",
        "--trainer.max_steps", "12",
        "--trainer.val_check_interval", "6",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
        "--model.encoder.init_args.model_kwargs",
        '{"features_only": true, "out_indices": [2], "channels": [8, 16, 32, 64], "stem_width": 8}',
        "--model.decoder.init_args.hidden_dim", "32",
        *extra,
    ]  # fmt: skip
    return subprocess.run([CAPLINE, "fit", *args], env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def logged(run: Path, key: str) -> list[float]:
    return [row[key] for row in wandb_rows(run)[1] if key in row]


def test_drops_503s_and_stalls_are_resumed_and_every_image_is_scored_once(tmp_path, synthetic_data):
    folder = Path(synthetic_data["train_shards"]).parent
    plan = {
        # the first request detects the layout; the first validation's is cut mid-tar, its resume answered 503,
        # the next one stalls (9,000 bytes, then 6 s of silence; stall_s is 2)
        "val-000000.tar": ["ok", "drop:3000", "503", "stall:9000:6"],
        "train-000000.tar": ["503", "503"],  # unavailable twice, then served
        "train-000001.tar": ["drop:20000", "drop:30000"],  # cut twice, further on each time
    }
    server, base = serve(folder, plan, tmp_path)
    try:
        started = time.monotonic()
        result = fit_over_http(tmp_path, synthetic_data, base, [])
        took = time.monotonic() - started
    finally:
        server.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    requests = (folder / "requests.log").read_text().splitlines()
    (folder / "requests.log").unlink()
    (tmp_path / "requests.log").write_text("\n".join(requests))
    print(f"\nfit over the flaky server: {took:.0f} s, {len(requests)} requests")
    # each broken read resumed at the byte it broke: a Range request, not the whole shard again
    assert "val-000000.tar bytes=3000- 503" in requests, requests
    assert "val-000000.tar bytes=3000- stall:9000:6" in requests, requests
    assert "val-000000.tar bytes=12000- ok" in requests, requests
    assert "train-000001.tar bytes=20000- drop:30000" in requests
    run = tmp_path / "run"
    assert logged(run, "val/num_images") == [synthetic_data["num_val"]] * 2  # every image, once, both times
    assert logged(run, "data/skipped/broken_shard") == [0.0, 0.0]
    assert "Traceback" not in result.stderr


def test_a_shard_that_never_comes_is_counted_and_named_not_waited_on(tmp_path, synthetic_data):
    folder = Path(synthetic_data["train_shards"]).parent
    # after the layout's detection, each validation's request stalls after 30,000 bytes, and its retry at once
    plan = {"val-000000.tar": ["ok", *(["stall:30000:30", "stall:0:30"] * 2), *(["stall:0:30"] * 20)]}
    server, base = serve(folder, plan, tmp_path)
    try:
        started = time.monotonic()
        result = fit_over_http(tmp_path, synthetic_data, base, ["--data.http.retries", "1"])
        took = time.monotonic() - started
    finally:
        server.kill()
    requests = (folder / "requests.log").read_text().splitlines()
    (folder / "requests.log").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\nfit with a shard that always stalls: {took:.0f} s, requests: {requests}")
    assert took < 240  # two validations of two stalls each (2 s), not 30 s per request
    url = f"{base}/val-000000.tar"
    warnings = [line for line in result.stderr.splitlines() if url in line and "broken_shard" in line]
    assert warnings and "stall" in warnings[0], result.stderr[-3000:]
    counted = logged(tmp_path / "run", "val/num_images")
    # the samples in the shard's first 30,000 bytes, once each, at both validations; not the rest of it
    assert len(counted) == 2 and 0 < counted[0] < synthetic_data["num_val"] and counted[0] == counted[1]
