"""The official COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

Both sides are tokenised with pycocoevalcap's PTB tokenizer, as the official evaluation does, and the scorers run
one by one, so a scorer that cannot run here (SPICE without its Stanford CoreNLP models) is skipped instead of
failing the whole evaluation as `COCOEvalCap.evaluate()` would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pycocoevalcap.spice.get_stanford_models as spice_models
import pycocoevalcap.tokenizer.ptbtokenizer as ptb
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice

log = logging.getLogger(__name__)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def load_coco_references(path: str | os.PathLike) -> dict[int, list[str]]:
    """Reads a COCO captions annotation file (`{"annotations": [{"image_id", "caption"}, ...]}`).

    Returns:
        Image id -> its reference captions, in file order.
    """
    data = _read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path} is not a COCO captions annotation file: it has no 'annotations' list")
    references: dict[int, list[str]] = {}
    for i, annotation in enumerate(annotations):
        image_id, caption = _id_and_caption(annotation, f"{path}: annotation {i}")
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise ValueError(f"{path} holds no annotations")
    return references


def load_coco_results(path: str | os.PathLike) -> dict[int, str]:
    """Reads a COCO captioning results file (`[{"image_id", "caption"}, ...]`, one caption per image).

    Returns:
        Image id -> generated caption, in file order.
    """
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} is not a COCO results file: expected a non-empty JSON list of {{image_id, caption}}")
    results: dict[int, str] = {}
    for i, entry in enumerate(data):
        image_id, caption = _id_and_caption(entry, f"{path}: entry {i}")
        if image_id in results:
            raise ValueError(f"{path}: image id {image_id} has more than one caption; keep one per image")
        results[image_id] = caption
    return results


def evaluate_coco(
    references: Mapping[Any, list[str]], results: Mapping[Any, str], spice: bool = True
) -> dict[str, float]:
    """Scores generated captions with the official COCO caption metrics, on the image ids of `results`.

    Args:
        references: Image id -> reference captions (raw text; tokenised here).
        results: Image id -> one generated caption (raw text).
        spice: Also run SPICE when its Stanford CoreNLP models are installed; otherwise it is skipped with one
            logged line.

    Returns:
        `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr` and, when it ran, `SPICE`.
    """
    _check_ids(references, results)
    _check_java()
    run_spice = spice and _spice_runs()
    tokenizer = ptb.PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in results})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in results.items()})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if run_spice:
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when it can; never triggers pycocoevalcap's model download."""
    lib = Path(spice_models.SPICEDIR) / spice_models.SPICELIB
    jars = (f"{spice_models.JAR}.jar", f"{spice_models.JAR}-models.jar")
    missing = [name for name in jars if not (lib / name).is_file()]
    if missing:
        return f"its Stanford CoreNLP models ({', '.join(missing)}) are not in {lib} and would have to be downloaded"
    if not os.access(spice_models.SPICEDIR, os.W_OK):
        return f"it writes its temporary and cache files into {spice_models.SPICEDIR}, which is not writable"
    return None


def _spice_runs() -> bool:
    reason = spice_unavailable_reason()
    if reason is not None:
        log.warning("SPICE skipped: %s", reason)
    return reason is None


def _meteor(gts: dict, res: dict) -> float:
    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        del scorer  # its __del__ stops the METEOR Java process now instead of at interpreter exit


def _check_ids(references: Mapping[Any, list[str]], results: Mapping[Any, str]) -> None:
    if not results:
        raise ValueError("there are no results to evaluate")
    missing = [i for i in results if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} result image ids have no references, e.g. {missing[0]!r}")
    empty = [i for i in results if not references[i]]
    if empty:
        raise ValueError(f"{len(empty)} result image ids have an empty reference list, e.g. {empty[0]!r}")


def _check_java() -> None:
    """Fails before any work when the Java tools pycocoevalcap runs cannot start."""
    if shutil.which("java") is None:
        raise RuntimeError("the official COCO metrics need Java (PTB tokenizer, METEOR), but 'java' is not on PATH")
    tokenizer_dir = os.path.dirname(os.path.abspath(ptb.__file__))
    if not os.access(tokenizer_dir, os.W_OK):
        raise RuntimeError(
            f"pycocoevalcap's PTB tokenizer writes a temporary file into {tokenizer_dir}, which this user "
            "cannot write; install pycocoevalcap where it is writable (e.g. a user-owned virtualenv)"
        )


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _id_and_caption(entry: Any, where: str) -> tuple[int, str]:
    valid = isinstance(entry, dict) and isinstance(entry.get("caption"), str)
    if not (valid and isinstance(entry.get("image_id"), (int, str))):
        raise ValueError(f"{where} needs an 'image_id' (int or str) and a string 'caption', got {entry!r:.100}")
    return entry["image_id"], entry["caption"]
