"""Benchmarks whose `run(quick=False)` returns rows of `{"name", "value", "goal", "ok"}`."""


def row(name: str, value: float, goal: float | str = "report", ok: bool = True) -> dict:
    """One result row; `goal="report"` marks a figure that is reported, not judged."""
    return {"name": name, "value": float(value), "goal": goal, "ok": bool(ok)}
