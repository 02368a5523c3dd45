"""`capline evaluate`: the real command on the demo fixture, its table, and one-line errors with exit code 2."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
COMMAND = [sys.executable, "-m", "capline", "evaluate"]  # the `capline` entry point, as `python -m`
FIXTURE = ROOT / "tests" / "fixtures" / "coco-caption-demo"
REFERENCES = FIXTURE / "captions_val2014_subset.json"
RESULTS = FIXTURE / "captions_val2014_fakecap_results.json"


def load_script():
    return importlib.import_module("capline.commands.evaluate")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="the official metrics run Java")
def test_json_output_on_the_demo_fixture():
    completed = subprocess.run(
        [
            *COMMAND,
            "--annotations",
            str(REFERENCES),
            "--results",
            str(RESULTS),
            "--json",
            "--no-spice",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    scores = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = json.loads((FIXTURE / "expected_scores.json").read_text())["full_precision"]
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name


def test_table_output(monkeypatch, capsys):
    script = load_script()
    fake = {"Bleu_1": 0.57939, "CIDEr": 0.59979}
    monkeypatch.setattr(script, "evaluate_coco", lambda refs, results, spice: fake)
    assert script.main(["--annotations", str(REFERENCES), "--results", str(RESULTS)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table == ["metric    score   (1000 images)", "Bleu_1    0.579", "CIDEr     0.600"]


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    script = load_script()
    missing = tmp_path / "missing.json"
    assert script.main(["--annotations", str(REFERENCES), "--results", str(missing)]) == 2
    assert capsys.readouterr().err == f"capline evaluate: error: {missing} does not exist\n"
    foreign = tmp_path / "foreign.json"
    foreign.write_text('[{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "a dog"}]')
    assert script.main(["--annotations", str(REFERENCES), "--results", str(foreign)]) == 2
    assert capsys.readouterr().err == "capline evaluate: error: 2 result image ids have no references, e.g. 1\n"


def test_the_script_runs_from_the_repo_root_and_fails_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    completed = subprocess.run(
        [*COMMAND, "--annotations", str(bad), "--results", str(RESULTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"capline evaluate: error: {bad} is not valid JSON")
    assert len(completed.stderr.splitlines()) == 1 and completed.stdout == ""
    usage = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1
