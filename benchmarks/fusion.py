"""Fusion before and after the rework on the same member maps: labels, entropy, seconds.

For each scan the default model's members are run once; the member maps then go through the
baseline fusion (``fuse_on_grid`` of commit ``pipeline.BASELINE``: every channel resampled to the
input grid, then decided) and through the current ``fuse_and_decide``. Printed per scan: the share
of equal voxels, Dice and symmetric 95th-percentile / mean surface distance (mm) per structure
(before post-processing), how the entropy differs (max, median, share beyond half the 1/1000
quantisation step) and both fusion times. Scans: the demo (always) and any given files or DICOM
folders (e.g. the real scans under ../shared/data).

    nice -n 10 python benchmarks/fusion.py [SCAN ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _baseline_inference(folder: Path):
    """The baseline ``segmentation/inference.py`` as a module of its own (the current one stays)."""
    pipeline = _module("kneeseg_benchmark_pipeline", HERE / "pipeline.py")
    source = subprocess.run(
        ["git", "show", f"{pipeline.BASELINE}:KneeSegLogic/segmentation/inference.py"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (folder / "baseline_inference.py").write_text(source)
    return _module("kneeseg_baseline_inference", folder / "baseline_inference.py"), pipeline


def compare(scan: str, threads: int, folder: Path) -> dict:
    import numpy as np
    import torch

    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import segmentation_image
    from KneeSegLogic.segmentation import inference
    from KneeSegLogic.segmentation.calibration import decide_labels
    from KneeSegLogic.segmentation.registry import get_package
    from KneeSegLogic.segmentation.uncertainty import entropy
    from KneeSegLogic.tissues import BY_LABEL

    torch.set_num_threads(threads)
    baseline, pipeline = _baseline_inference(folder)
    volume = read_volume(scan)
    package = get_package(None)
    log = inference.RunLog()
    reference = segmentation_image(volume, None)
    members = [
        (
            inference.member_probabilities(
                package, index, segmentation_image(volume, member.echo_index), torch.device("cpu"), log
            ),
            member.weight,
        )
        for index, member in enumerate(package.members)
    ]
    start = time.perf_counter()
    channels, _ = baseline.fuse_on_grid(members, reference)
    old_labels = decide_labels(channels, package.decision_offsets)
    old_entropy = entropy(channels)
    old_s = time.perf_counter() - start
    del channels
    start = time.perf_counter()
    fusion = inference.fuse_and_decide(members, reference, package.decision_offsets)
    new_s = time.perf_counter() - start
    channel_labels = np.asarray(package.tissue_labels)
    old_map, new_map = channel_labels[old_labels], channel_labels[fusion.channel_index]
    structures = {}
    for value in sorted(set(np.unique(old_map)) - {0}):
        structures[BY_LABEL[int(value)].key] = _agreement(old_map == value, new_map == value, reference.spacing_kji)
    gap = np.abs(old_entropy - fusion.entropy)
    return {
        "scan": Path(scan).name,
        "shape": list(reference.array.shape),
        "voxels_equal": float(np.mean(old_map == new_map)),
        "structures": structures,
        "entropy": {
            "max_abs": round(float(gap.max()), 4),
            "median_abs": float(np.median(gap)),
            "share_over_half_step": round(float(np.mean(gap > 5e-4)), 4),
        },
        "fusion_s": {"baseline": round(old_s, 2), "new": round(new_s, 2)},
    }


def _agreement(a, b, spacing) -> dict:
    import numpy as np
    from scipy import ndimage

    dice = 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
    if np.array_equal(a, b) or not b.any():
        return {"dice": round(float(dice), 6), "hd95_mm": 0.0 if np.array_equal(a, b) else None}
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    both = np.concatenate([to_a, to_b])
    return {
        "dice": round(float(dice), 6),
        "hd95_mm": round(float(np.percentile(both, 95)), 3),
        "assd_mm": round(float(both.mean()), 4),
    }


def main() -> None:
    from KneeSegLogic.resources import DEMO_SCAN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for scan in [str(DEMO_SCAN), *args.scans]:
            print(json.dumps(compare(scan, args.threads, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
