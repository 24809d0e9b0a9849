"""Robustness on a real scan: the same knee re-acquired as thick axial / coronal slices.

No real scan with expert labels is available, so this measures *consistency*, not accuracy: a
real scan is segmented as acquired; then thick-slice 2D acquisitions in other orientations are
simulated from it (slice profile = Gaussian with FWHM = slice thickness, then resampling onto
the new grid), segmented again, and their labels are mapped back (nearest neighbour) onto the
original grid and compared with the first segmentation (Dice per structure). A model that
depends on the acquisition orientation or slice thickness loses agreement here.

    python benchmarks/reacquisition.py SCAN [--echo 2] [--threads 2]

Prints a table and, last, one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from KneeSegLogic.evaluation.metrics import evaluate
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import (
    Volume,
    reorient,
    resample_to_grid,
    resample_to_spacing,
)

# (name, orientation code whose slowest axis is the slice normal, in-plane mm, slice mm)
ACQUISITIONS = (
    ("axial 4 mm", "LPS", 0.6, 4.0),
    ("coronal 3 mm", "LSP", 0.6, 3.0),
    ("sagittal 4 mm", "PSL", 0.6, 4.0),
)
FWHM_TO_SIGMA = 1 / (2 * np.sqrt(2 * np.log(2)))


def reacquire(scan: Volume, orientation: str, pixel_mm: float, slice_mm: float) -> Volume:
    """The scan as a 2D acquisition: slices ``slice_mm`` thick along the last axis of ``orientation``."""
    turned = reorient(scan, orientation)  # array axis 0 (k) is the new slice normal
    # The source's own resolution along the new normal already blurs it: add only what is missing.
    source_fwhm = turned.spacing[2]
    sigma_mm = np.sqrt(max(slice_mm**2 - source_fwhm**2, 0.0)) * FWHM_TO_SIGMA
    blurred = ndimage.gaussian_filter1d(turned.array.astype(np.float32), sigma_mm / turned.spacing[2], axis=0)
    return resample_to_spacing(turned.with_array(blurred), (pixel_mm, pixel_mm, slice_mm))


def segment(scan: Volume, threads: int) -> tuple[Volume, float]:
    import torch

    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.pipeline.segment import segment_volume
    from KneeSegLogic.segmentation.registry import get_package

    torch.set_num_threads(threads)
    start = time.perf_counter()
    labels, _, _ = segment_volume(
        scan, get_package(None), torch.device("cpu"), Results("reacquisition"), Progress(None)
    )
    return labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", help="a real knee scan (file or DICOM folder)")
    parser.add_argument(
        "--echo", type=int, default=None, help="1-based echo of a multi-echo scan (default: all, as segment)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    scan = read_volume(args.scan)
    if args.echo is not None:
        scan = scan.echo(args.echo - 1)
    elif scan.is_multi_echo:  # the same single image segment uses for every reacquisition
        from KneeSegLogic.pipeline.segment import segmentation_image

        scan = segmentation_image(scan, None)
    reference, seconds = segment(scan, args.threads)
    rows = {"as acquired": {"seconds": round(seconds, 1)}}
    for name, orientation, pixel_mm, slice_mm in ACQUISITIONS:
        moved = reacquire(scan, orientation, pixel_mm, slice_mm)
        labels, seconds = segment(moved, args.threads)
        back = resample_to_grid(labels, reference, is_label=True)
        result = evaluate(back, reference)
        rows[name] = {
            "seconds": round(seconds, 1),
            "grid": list(moved.size),
            "dice": {s: round(float(m["dice"]), 3) for s, m in result["structures"].items()},
        }
    structures = sorted({s for row in rows.values() for s in row.get("dice", {})})
    print(f"scan: {args.scan}  grid {list(scan.size)}  spacing {[round(s, 3) for s in scan.spacing]} mm")
    print("Dice against the segmentation of the scan as acquired:")
    print(f"{'re-acquisition':<16}" + "".join(f"{s[:14]:>15}" for s in structures) + f"{'seconds':>9}")
    for name, row in rows.items():
        if "dice" in row:
            print(
                f"{name:<16}"
                + "".join(f"{row['dice'].get(s, float('nan')):>15.3f}" for s in structures)
                + f"{row['seconds']:>9.1f}"
            )
    print(json.dumps({"scan": str(Path(args.scan)), "rows": rows}))


if __name__ == "__main__":
    main()
