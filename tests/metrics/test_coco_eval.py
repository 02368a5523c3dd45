"""The official COCO metrics: loaders, their errors, SPICE detection, and conformance with the published demo scores."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from capline.metrics import coco_eval
from capline.metrics.coco_eval import evaluate_coco, load_coco_references, load_coco_results

FIXTURE = Path(__file__).parents[1] / "fixtures" / "coco-caption-demo"
REFERENCES = FIXTURE / "captions_val2014_subset.json"
RESULTS = FIXTURE / "captions_val2014_fakecap_results.json"
EXPECTED = json.loads((FIXTURE / "expected_scores.json").read_text())

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the official metrics run Java")


def test_loaders_read_the_demo_files():
    references, results = load_coco_references(REFERENCES), load_coco_results(RESULTS)
    assert len(references) == 1000 and sum(map(len, references.values())) == 5005
    assert len(results) == 1000 and set(results) <= set(references)
    assert references[331352][0] == "A small closed toilet in a cramped space."


def test_loaders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_coco_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "caption": "a"')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_coco_results(tmp_path / "bad.json")
    (tmp_path / "twice.json").write_text('[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]')
    with pytest.raises(ValueError, match="image id 1 has more than one caption"):
        load_coco_results(tmp_path / "twice.json")
    (tmp_path / "results.json").write_text('[{"image_id": 1, "caption": "a"}]')
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load_coco_references(tmp_path / "results.json")
    (tmp_path / "no_caption.json").write_text('{"annotations": [{"image_id": 1}]}')
    with pytest.raises(ValueError, match=r"annotation 0 needs an 'image_id' \(int or str\) and a string 'caption'"):
        load_coco_references(tmp_path / "no_caption.json")


def test_result_ids_without_references_are_counted_with_an_example():
    with pytest.raises(ValueError, match="2 result image ids have no references, e.g. 8"):
        evaluate_coco({1: ["a cat"]}, {1: "a cat", 8: "a dog", 9: "a bird"})


def test_missing_java_or_an_unwritable_tokenizer_directory_fail_before_any_work(monkeypatch):
    monkeypatch.setattr(coco_eval.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="'java' is not on PATH"):
        evaluate_coco({1: ["a cat"]}, {1: "a cat"})
    monkeypatch.setattr(coco_eval.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(coco_eval.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match="PTB tokenizer writes a temporary file into .*tokenizer, which this user"):
        evaluate_coco({1: ["a cat"]}, {1: "a cat"})


def test_spice_is_available_only_with_its_corenlp_jars(tmp_path, monkeypatch):
    monkeypatch.setattr(coco_eval.spice_models, "SPICEDIR", str(tmp_path))
    (tmp_path / "lib").mkdir()
    assert "stanford-corenlp-3.6.0.jar, stanford-corenlp-3.6.0-models.jar" in coco_eval.spice_unavailable_reason()
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / "lib" / name).write_bytes(b"")
    assert coco_eval.spice_unavailable_reason() is None
    monkeypatch.setattr(coco_eval.os, "access", lambda path, mode: False)
    assert coco_eval.spice_unavailable_reason().endswith(f"files into {tmp_path}, which is not writable")


@pytest.fixture(scope="module")
def demo_scores():
    """evaluate_coco on the demo files once (about 10 s of Java), SPICE forced unavailable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_eval, "spice_unavailable_reason", lambda: "no CoreNLP in this test")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        coco_eval.log.addHandler(handler)
        try:
            scores = evaluate_coco(load_coco_references(REFERENCES), load_coco_results(RESULTS), spice=True)
        finally:
            coco_eval.log.removeHandler(handler)
    return scores, [r.getMessage() for r in records]


@pytest.mark.slow
@needs_java
def test_demo_reproduces_every_published_score(demo_scores):
    scores, _ = demo_scores
    published = {k: v for k, v in EXPECTED["published_3dp"].items() if k != "SPICE"}
    assert {k: round(scores[k], 3) for k in published} == published
    for name, value in EXPECTED["full_precision"].items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
@needs_java
def test_unavailable_spice_is_skipped_with_one_logged_line(demo_scores):
    scores, messages = demo_scores
    assert list(scores) == list(coco_eval.METRIC_NAMES)
    assert messages == ["SPICE skipped: no CoreNLP in this test"]
