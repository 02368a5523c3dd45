"""The peer benchmark's contract, shrunk: capline's loader and open_clip's pipeline timed on every layout, each
ratio the two rates measured in the same run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_peer_rows_are_ratios_of_rates_measured_together(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from tools.benchmarks import peer

    rows = {r["name"]: r for r in peer.run(quick=True, num_images=100, worker_counts=(1,))}
    for layout in ("raw", "pre256", "img2dataset"):
        ratio = rows[f"peer_capline_vs_open_clip_{layout}_1w"]
        capline, other = rows[f"peer_capline_img_s_{layout}_1w"], rows[f"peer_open_clip_img_s_{layout}_1w"]
        assert math.isfinite(capline["value"]) and capline["value"] > 0 and other["value"] > 0
        assert ratio["value"] == pytest.approx(capline["value"] / other["value"])
        assert ratio["goal"] == 2.0 and ratio["ok"] == (ratio["value"] >= 2.0)
