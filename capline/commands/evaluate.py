"""Scores a COCO captioning results file with the official metrics (BLEU 1-4, METEOR, ROUGE-L, CIDEr, SPICE).

Usage (needs Java; SPICE runs only when its Stanford CoreNLP models are installed):

    capline evaluate --annotations captions_val2014.json --results results.json
    capline evaluate --annotations captions_val2014.json --results results.json --json --no-spice

Only the image ids present in the results file are scored, as in the official evaluation. With `--json` the last
stdout line is one JSON object of the scores. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from capline.metrics.coco_eval import evaluate_coco, load_coco_references, load_coco_results

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage block, like every other error of this tool.
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="capline evaluate", description="Official COCO caption metrics of a results file.")
    parser.add_argument("--annotations", required=True, help="COCO captions annotation JSON (the references)")
    parser.add_argument("--results", required=True, help="results JSON: a list of {image_id, caption}")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even when it could run")
    return parser.parse_args(argv)


def format_table(scores: dict[str, float], num_images: int) -> str:
    """The scores as an aligned two-column table."""
    lines = [f"{'metric':<8}  score   ({num_images} images)"]
    lines += [f"{name:<8}  {value:.3f}" for name, value in scores.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        references = load_coco_references(args.annotations)
        results = load_coco_results(args.results)
        scores = evaluate_coco(references, results, spice=not args.no_spice)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"capline evaluate: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(scores) if args.json else format_table(scores, len(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
