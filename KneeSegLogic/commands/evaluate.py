"""``kneeseg evaluate PREDICTION REFERENCE``: Dice, IoU, precision, recall, HD95, ASSD per structure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "compare a segmentation with a reference: Dice, IoU, HD95, ASSD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", type=Path, help="predicted segmentation (.seg.nrrd or label volume)")
    parser.add_argument("reference", type=Path, help="reference segmentation")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import warnings

    from KneeSegLogic.evaluation.metrics import evaluate_files, format_table, to_json

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_files(args.prediction, args.reference)
    result["warnings"] = [str(w.message) for w in caught] + result["warnings"]
    for message in result["warnings"]:
        print(f"kneeseg evaluate: warning: {message}", file=sys.stderr)
    print(to_json(result) if args.json else format_table(result))
    return 0
