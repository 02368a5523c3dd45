"""Benchmarks whose `run(quick=False)` returns rows of `{"name", "value", "goal", "ok"}`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def row(name: str, value: float, goal: float | str = "report", ok: bool = True) -> dict:
    """One result row; `goal="report"` marks a figure that is reported, not judged."""
    return {"name": name, "value": float(value), "goal": goal, "ok": bool(ok)}


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned table: name, value, goal, status (ok, MISS, report or not measured) and any note."""
    lines = [f"{'name':<48} {'value':>12}  {'goal':>8}  status"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        goal = "report" if r["goal"] in (None, "report") else f"{r['goal']:g}"
        if r["ok"] is None:
            status = "not measured"
        elif goal == "report":
            status = "report"
        else:
            status = "ok" if r["ok"] else "MISS"
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['name']:<48} {value:>12}  {goal:>8}  {status}{note}")
    return "\n".join(lines)


def main(doc: str, run: Callable[..., list[dict]], quick_help: str) -> None:
    """The command line of one benchmark module: `python -m tools.benchmarks.NAME [--quick]`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    print(format_table(run(quick=parser.parse_args().quick)))
