"""Benchmarks whose `run(quick=False)` returns rows of `{"name", "value", "goal", "ok"}`."""
