"""The real `capline` console script, as installed next to the running Python (activated venv or not)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def capline_executable() -> str:
    beside = Path(sys.executable).with_name("capline")
    found = str(beside) if beside.exists() else shutil.which("capline")
    if found is None:
        raise RuntimeError("the capline command is not installed: pip install -e '.[dev]'")
    return found


CAPLINE = capline_executable()
