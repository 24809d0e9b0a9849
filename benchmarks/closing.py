"""Benchmark: ball closing of radius 9 voxels on a 384x384x160 mask, and surfaces of a knee.

Closing: KneeSeg's EDT closing (``postprocess.ball_closing``) against
``skimage.morphology.binary_closing(mask, ball(9))`` (the reference: same voxels asserted),
``skimage.morphology.isotropic_closing`` (scipy's EDT; same voxels asserted) and
``scipy.ndimage.binary_closing`` with ``ball(9)`` (its border rule differs: it erodes from the
volume edge, so its disagreement with the reference is reported, not asserted). Two masks:
the femur (label 5) of ``Resources/SampleData/knee_labels.nrrd`` and random blobs filling the
volume. Budget: >= 30x faster than scikit-image.

Surfaces: ``surfaces.build_surfaces`` on every structure of the same label map (budget: a
second or two), wall and CPU seconds (VTK runs on one thread here, so CPU seconds are what the
surfaces would take on an idle machine).

Run from the repository root: ``python benchmarks/closing.py``. Prints a table and, as the last
line, one JSON object with the ratios.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import ball, binary_closing, isotropic_closing
from timing import best_time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.quantification.surfaces import build_surfaces
from KneeSegLogic.segmentation.postprocess import ball_closing

RADIUS = 9
REPEATS = 3  # for the fast methods; the slow ones run once


def random_blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), 4.0)
    return noise > 0.5 * noise.std()


def bench_closing(name: str, mask: np.ndarray) -> dict[str, float]:
    footprint = ball(RADIUS)
    ours_s, ours = best_time(lambda: ball_closing(mask, RADIUS), REPEATS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_closing is deprecated in 0.26
        skimage_s, reference = best_time(lambda: binary_closing(mask, footprint))
    edt_s, scipy_edt = best_time(lambda: isotropic_closing(mask, RADIUS))
    scipy_s, scipy_result = best_time(lambda: ndimage.binary_closing(mask, footprint))
    assert np.array_equal(ours, reference), f"{name}: EDT closing differs from scikit-image"
    assert np.array_equal(scipy_edt, reference), f"{name}: isotropic_closing differs from scikit-image"
    scipy_differs = int(np.count_nonzero(scipy_result != reference))
    rows = [
        ("KneeSeg ball_closing (edt)", ours_s, "identical"),
        ("skimage binary_closing(ball(9))", skimage_s, "reference"),
        ("skimage isotropic_closing (scipy EDT)", edt_s, "identical"),
        ("scipy.ndimage.binary_closing(ball(9))", scipy_s, f"{scipy_differs} voxels differ (border rule)"),
    ]
    changed = int(np.count_nonzero(reference != mask))
    print(f"\n{name}: shape {mask.shape}, {int(mask.sum())} voxels in the mask, {changed} changed by the closing")
    print(f"  {'method':40s} {'seconds':>9s} {'x ours':>8s}  voxels")
    for label, seconds, same in rows:
        print(f"  {label:40s} {seconds:9.3f} {seconds / ours_s:8.1f}  {same}")
    return {
        "ours_s": round(ours_s, 4),
        "skimage_over_ours": round(skimage_s / ours_s, 2),
        "scipy_edt_over_ours": round(edt_s / ours_s, 2),
        "scipy_binary_closing_over_ours": round(scipy_s / ours_s, 2),
    }


def bench_surfaces(labels) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as folder:
            wall, cpu = time.perf_counter(), time.process_time()
            section = build_surfaces(labels, Path(folder))
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    triangles = sum(entry["triangles"] for entry in section["structures"].values())
    closed = all(entry["closed"] and entry["manifold"] for entry in section["structures"].values())
    print(
        f"\nsurfaces: {len(section['structures'])} structures, {triangles} triangles, all closed and manifold: {closed}"
    )
    print(
        f"  build_surfaces (windowed-sinc, STL+VTP)  wall {min(walls):.3f} s, CPU {min(cpus):.3f} s (best of {REPEATS})"
    )
    return {"surfaces_wall_s": round(min(walls), 3), "surfaces_cpu_s": round(min(cpus), 3)}


def main() -> None:
    labels = read_volume(REPO / "Resources" / "SampleData" / "knee_labels.nrrd")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"ball closing radius {RADIUS} voxels; {cpus} CPUs; load average {os.getloadavg()[0]:.2f}")
    summary = {
        "femur": bench_closing("femur (label 5)", labels.array == 5),
        "random_blobs": bench_closing("random blobs", random_blobs(labels.array.shape)),
    }
    summary.update(bench_surfaces(labels))
    summary["closing_budget_30x_met"] = all(
        summary[case]["skimage_over_ours"] >= 30 for case in ("femur", "random_blobs")
    )
    summary["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
