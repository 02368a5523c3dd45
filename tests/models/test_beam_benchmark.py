"""`tools/benchmarks/beam.py` shrunk to a second: its rows, and how it compares captions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "benchmarks" / "beam.py"


@pytest.fixture
def beam(monkeypatch):
    spec = importlib.util.spec_from_file_location("beam_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in {"VOCAB_SIZE": 50, "FEATURE_DIM": 16, "GRID": 3, "NUM_IMAGES": 12, "MAX_LEN": 6}.items():
        monkeypatch.setattr(module, name, value)
    return module


def test_rows_and_identical_captions(beam):
    rows = {row["name"]: row for row in beam.run(quick=True)}
    assert list(rows)[:2] == ["beam3_batched_speedup_12", "beam3_identical_captions"]
    assert rows["beam3_identical_captions"] == {"name": "beam3_identical_captions", "value": 1.0, "goal": 1.0,
                                                "ok": True}  # fmt: skip
    speedups = []
    for name in ("show_tell", "attention"):
        per_image, batched = rows[f"beam3_per_image_s_12_{name}"], rows[f"beam3_batched_s_12_{name}"]
        speedups.append(rows[f"beam3_batched_speedup_12_{name}"]["value"])
        assert speedups[-1] == pytest.approx(per_image["value"] / batched["value"])
    assert rows["beam3_batched_speedup_12"]["value"] == min(speedups)
    assert rows["beam3_batched_speedup_12"]["goal"] == 10.0


def test_captions_compare_equal_across_padding_only(beam):
    assert beam._same(torch.tensor([5, 6, 2, 0, 0]), torch.tensor([5, 6, 2]))
    assert not beam._same(torch.tensor([5, 6, 2, 0]), torch.tensor([5, 7, 2]))
    assert not beam._same(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 8]))
