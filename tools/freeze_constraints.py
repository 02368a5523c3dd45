"""Writes constraints.txt: the exact version of every package `capline[dev]` pulls in, as installed here.

Run it in the environment where the whole test suite just passed:

    pip install -e ".[dev]" && pytest && python tools/freeze_constraints.py

It is `pip freeze` narrowed to capline's dependency closure (so unrelated packages of the environment stay out,
and capline itself too), with local version labels dropped (`torch==2.5.1`, not `2.5.1+cu124`), so the same file
installs from PyPI or from a PyTorch index. Then `pip install -e ".[dev]" -c constraints.txt` reproduces it.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """{name: installed version} of everything `root[extras]` requires, transitively (root excluded)."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), frozenset(wanted)) in seen:
            continue
        seen.add((canonicalize_name(name), frozenset(wanted)))
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [default_environment() | {"extra": e} for e in (wanted or {""})]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency not installed here: nothing to pin
            found[canonicalize_name(req.name)] = version
            todo.append((req.name, set(req.extras)))
    found.pop(canonicalize_name(root), None)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "constraints.txt")
    args = parser.parse_args(argv)
    pins = closure("capline", {"dev"})
    lines = [f"{name}=={re.sub(r'[+].*$', '', version)}" for name, version in sorted(pins.items())]
    header = "# Exact versions the test suite passed with; refresh: python tools/freeze_constraints.py (see README)\n"
    args.out.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {args.out}")


if __name__ == "__main__":
    main()
