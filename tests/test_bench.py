"""`tools/bench.py`: the JSON contract of its rows, on benchmarks shrunk to seconds. Nothing here is timed."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `tools.benchmarks` as bench.py imports it
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Shrunk: one scheduled-sampling step of each setting on 4 images, no warm-up; no GPU even if there is one.
    sampling = importlib.import_module("tools.benchmarks.sampling")
    monkeypatch.setattr(sampling, "WARMUP_STEPS", 0)
    monkeypatch.setattr(sampling, "make_batches", functools.partial(sampling.make_batches, batch_size=4))
    monkeypatch.setattr(sampling, "run", functools.partial(sampling.run, steps=1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return module


def json_rows(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def check_row(row: dict) -> None:
    assert set(row) <= {"name", "value", "goal", "ok", "note"} and {"name", "value", "goal", "ok"} <= set(row)
    assert isinstance(row["name"], str) and row["name"]
    assert row["goal"] is None or row["goal"] == "report" or isinstance(row["goal"], (int, float))
    if row["value"] is None:  # not measured
        assert row["ok"] is None and row["note"]
    else:
        assert isinstance(row["value"], float) and math.isfinite(row["value"])
        assert isinstance(row["ok"], bool)


def test_json_last_line_holds_every_row(bench, capsys):
    bench.main(["--quick", "--json", "--only", "sampling", "gpu"])
    rows = json_rows(capsys)
    for row in rows:
        check_row(row)
    by_name = {row["name"]: row for row in rows}
    for decoder in ("show_tell", "attention"):
        ratio = by_name[f"sched_sampling_step_ratio_{decoder}"]
        sampled, forced = by_name[f"sched_sampling_step_ms_{decoder}"], by_name[f"teacher_forcing_step_ms_{decoder}"]
        assert ratio["goal"] == 1.5 and ratio["ok"] == (ratio["value"] < 1.5)
        assert ratio["value"] == pytest.approx(sampled["value"] / forced["value"])
    gpu = [row for row in rows if row["name"].startswith("gpu_")]
    assert gpu and all(row["value"] is None and "CUDA" in row["note"] for row in gpu)


def test_a_failing_benchmark_is_a_not_measured_row_and_exit_status_1(bench, capsys, monkeypatch):
    def broken(quick: bool = False) -> list[dict]:
        raise RuntimeError("no shards")

    monkeypatch.setattr(importlib.import_module("tools.benchmarks.cider"), "run", broken)
    assert bench.main(["--json", "--only", "cider", "gpu"]) == 1
    rows = json_rows(capsys)
    for row in rows:
        check_row(row)
    assert rows[0] == {"name": "cider", "value": None, "goal": None, "ok": None,
                       "note": "failed: RuntimeError: no shards"}  # fmt: skip


def test_table_marks_misses_reports_and_unmeasured(bench):
    table = bench.format_table([
        {"name": "a", "value": 0.5, "goal": 0.9, "ok": False},
        {"name": "b", "value": 2.0, "goal": "report", "ok": True},
        {"name": "c", "value": None, "goal": "report", "ok": None, "note": "no CUDA device"},
    ])  # fmt: skip
    lines = table.splitlines()[1:]
    assert lines[0].split()[-1] == "MISS" and lines[1].split()[-1] == "report"
    assert "not measured" in lines[2] and "(no CUDA device)" in lines[2]


def test_scst_rows_compare_scst_and_cross_entropy_steps_and_report_the_reward_share(bench, capsys, monkeypatch):
    scst = importlib.import_module("tools.benchmarks.scst")  # shrunk: one step of each on 4 images, small corpus
    monkeypatch.setattr(scst, "WARMUP_STEPS", 0)
    monkeypatch.setattr(scst, "CORPUS_IMAGES", 20)
    monkeypatch.setattr(scst, "make_batches", functools.partial(scst.make_batches, batch_size=4))
    monkeypatch.setattr(scst, "run", functools.partial(scst.run, steps=1))
    bench.main(["--json", "--only", "scst"])
    by_name = {row["name"]: row for row in json_rows(capsys)}
    for decoder in ("show_tell", "attention"):
        ratio, share = by_name[f"scst_step_vs_xe_step_{decoder}"], by_name[f"scst_reward_share_{decoder}"]
        check_row(ratio)
        assert ratio["goal"] == 2.5 and ratio["ok"] == (ratio["value"] <= 2.5)
        scst_ms, xe_ms = by_name[f"scst_step_ms_{decoder}"]["value"], by_name[f"xe_step_ms_{decoder}"]["value"]
        assert ratio["value"] == pytest.approx(scst_ms / xe_ms)
        assert share["goal"] == "report" and 0 < share["value"] < 1


def test_resume_rows_compare_startup_at_10_and_90_percent_and_the_replay_before(bench, capsys, monkeypatch, tmp_path):
    resume = importlib.import_module("tools.benchmarks.resume")  # shrunk: 4,000 samples in 20 shards
    monkeypatch.setattr(resume, "SAMPLES", 4000)
    monkeypatch.setattr(resume, "SHARD_SIZE", 200)
    monkeypatch.setattr(resume, "prepare_shards", functools.partial(resume.prepare_shards, root=tmp_path / "shards"))
    bench.main(["--json", "--quick", "--only", "resume"])
    by_name = {row["name"]: row for row in json_rows(capsys)}
    for row in by_name.values():
        check_row(row)
    ratio = by_name["resume_startup_90pct_vs_10pct"]
    assert ratio["goal"] == 1.2 and ratio["ok"] == (ratio["value"] <= 1.2)
    late, replay = by_name["resume_startup_s_at_90pct"]["value"], by_name["resume_replay_s_at_90pct_before"]["value"]
    assert by_name["resume_startup_90pct_vs_replay_before"]["value"] == pytest.approx(late / replay)
