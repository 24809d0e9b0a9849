"""Model packages on knees they were not trained on: Dice and volume ratio per structure.

For each package given, every knee of an anatomy bank's ``heldout/`` folder (built by
``python3 -m KneeSegLogic.training.anatomy BANK``) and, for comparison, the bank's first training
knee (``pymskt_host``, the label map the first default model was trained on) is synthesised in the
named contrasts and acquisitions of :data:`KneeSegLogic.training.heldout.HELDOUT_ACQUISITIONS`
(whole scans, seeds unused in training) and segmented by the package's members with the
package's blending weights; each scan is scored after the package-builder's post-processing with
plain argmax (``offsets 0``) and with the package's decision offsets (``as shipped``).

Printed: mean Dice per structure per package, variant and knee set; mean Dice per acquisition;
mean predicted/true volume per structure. Structures absent from a knee's labels are not scored
(the clinical knee labels bones only).

With ``--flip-tta`` each package is also scored with flip test-time augmentation (its members also
predict the left-right mirrored scan; ``segment --flip-tta``).

    nice -n 10 python3 benchmarks/heldout_anatomies.py BANK [--model PACKAGE ...] [--repeats 1] [--flip-tta]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from KneeSegLogic.resources import BUNDLED_MODELS_DIR
from KneeSegLogic.segmentation.package import load_package
from KneeSegLogic.tissues import TISSUES
from KneeSegLogic.training import builder
from KneeSegLogic.training.data import load_anatomies, load_heldout_anatomies
from KneeSegLogic.training.heldout import HELDOUT_ACQUISITIONS

TRAINING_KNEE = "pymskt_host.nrrd"

#: Bones, then cartilage, then menisci, in the tissue table's order within each group.
STRUCTURES = tuple(t.key for group in ("bone", "cartilage", "meniscus") for t in TISSUES if t.group == group)


def scores(package_path: Path, knees: list, repeats: int, flip_tta: bool = False) -> dict:
    """Per case, ``offsets 0`` and ``as shipped`` scores of one package on ``knees``."""
    package = load_package(package_path)
    weights = [m.weight for m in package.members]
    per_case = builder.evaluate_heldout(package, knees, weights, package.decision_offsets, repeats, flip_tta)
    return {
        case: {"offsets 0": variants[builder.ENSEMBLE], "as shipped": variants[builder.FINAL]}
        for case, variants in per_case.items()
    }


def _mean(per_case: dict, variant: str, key: str, structure: str, cases: list[str]) -> float:
    values = [per_case[c][variant][key].get(structure) for c in cases]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bank", type=Path)
    parser.add_argument("--model", type=Path, action="append", help="package folder (default: the bundled one)")
    parser.add_argument("--repeats", type=int, default=1, help="scans per acquisition and knee")
    parser.add_argument("--json", type=Path, help="also write every score here")
    parser.add_argument(
        "--training-knee",
        default=TRAINING_KNEE,
        help=f"the training knee to compare with (a file name in BANK; default {TRAINING_KNEE}, the first "
        "default model's knee; jam_on_host.nrrd has the soft tissue of the held-out composed knee)",
    )
    parser.add_argument(
        "--flip-tta", action="store_true", help="also score each package with flip TTA (segment --flip-tta)"
    )
    args = parser.parse_args()
    heldout = load_heldout_anatomies(args.bank)
    training = load_anatomies(args.bank / args.training_knee)
    models = args.model or [BUNDLED_MODELS_DIR / "kneeseg-knee-2p5d"]
    everything = {}
    for model in models:
        for flip_tta in (False, True) if args.flip_tta else (False,):
            everything[str(model) + (" +flip TTA" if flip_tta else "")] = {
                "held-out knees": scores(model, heldout, args.repeats, flip_tta),
                "training knee": scores(model, training, args.repeats, flip_tta),
            }
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    columns = [(m, s, v) for m in everything for s in everything[m] for v in ("offsets 0", "as shipped")]
    print(
        "Mean Dice per structure ("
        + ", ".join(f"[{i}] {Path(m).name} {s} {v}" for i, (m, s, v) in enumerate(columns))
        + ")"
    )
    print("| structure | " + " | ".join(f"[{i}]" for i in range(len(columns))) + " |")
    print("|---|" + "---|" * len(columns))
    for structure in (*STRUCTURES, "volume ratio: femoral_cartilage"):
        key, name = ("volume_ratio", structure.split(": ")[1]) if ":" in structure else ("dice", structure)
        row = []
        for model, knee_set, variant in columns:
            per_case = everything[model][knee_set]
            row.append(_mean(per_case, variant, key, name, list(per_case)))
        print(f"| {structure} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in row) + " |")
    print("\nMean Dice over structures per acquisition (held-out knees, as shipped)")
    for model in everything:
        per_case = everything[model]["held-out knees"]
        for name, *_ in HELDOUT_ACQUISITIONS:
            cases = [c for c in per_case if c.split(": ")[-1].split(" #")[0] == name]
            means = [np.mean(list(per_case[c]["as shipped"]["dice"].values())) for c in cases]
            print(f"{Path(model).name:<24} {name:<28} {np.mean(means):.3f}")


if __name__ == "__main__":
    main()
