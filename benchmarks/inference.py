"""Inference cost on CPU: the default pipeline on a 384x384x160 knee, and batched vs per-patch 3D.

Each measurement runs in a fresh subprocess so its peak resident memory (VmHWM) is its own.
The default ensemble's architecture is used (the bundled weights if present, otherwise the same
networks with random weights: cost does not depend on weight values).

Prints a table and, last, one JSON object with the numbers and ratios.

    python benchmarks/inference.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "Resources" / "SampleData" / "knee_labels.nrrd"


def _default_package(folder: Path) -> Path:
    from KneeSegLogic.segmentation.networks import build_network
    from KneeSegLogic.segmentation.package import save_package
    from KneeSegLogic.segmentation.registry import find_packages
    from KneeSegLogic.training.builder import POSTPROCESSING, _spec
    from KneeSegLogic.training.trainer import DEFAULT_MEMBERS

    bundled = [p for p in find_packages() if p.default]
    if bundled:
        return bundled[0].path
    spec = _spec(DEFAULT_MEMBERS, [0.5, 0.5], {"note": "random weights for timing"}, {})
    spec["postprocessing"] = POSTPROCESSING
    states = [build_network(**m.architecture()).state_dict() for m in DEFAULT_MEMBERS]
    return save_package(folder / "timing-package", spec, states).path


def _scan(folder: Path, slices: int) -> Path:
    """A synthetic MESE echo-2 knee on the real 384x384x160 label grid (optionally fewer slices)."""
    import numpy as np

    from KneeSegLogic.io.scans import read_volume, write_volume
    from KneeSegLogic.io.volume import Volume
    from KneeSegLogic.training.phantom import synthesize_mese

    labels = read_volume(LABELS)
    if slices < labels.array.shape[0]:  # the central slices, on the same physical positions
        start = (labels.array.shape[0] - slices) // 2
        origin = np.asarray(labels.origin) + labels.direction @ np.array([0.0, 0.0, start * labels.spacing[2]])
        labels = Volume(labels.array[start : start + slices].copy(), labels.spacing, tuple(origin), labels.direction)
    path = folder / f"knee_{slices}.nrrd"
    write_volume(synthesize_mese(labels, snr=30).image.echo(1), path)
    return path


def measure_pipeline(scan: str, package: str, threads: int) -> dict:
    import torch

    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import segment_volume
    from KneeSegLogic.segmentation.package import load_package

    torch.set_num_threads(threads)
    volume = read_volume(scan)
    results = Results("benchmark")
    start = time.perf_counter()
    segment_volume(volume, load_package(package), torch.device("cpu"), results, Progress(None))
    return {"seconds": time.perf_counter() - start, "timings_s": results["timings_s"]}


def measure_sliding_window(batch: int, threads: int) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=11, features=(8, 16, 32, 64, 128, 8)).eval()
    calls = 0

    def predictor(x):
        nonlocal calls
        calls += 1
        return network(x)

    image = torch.rand(1, 1, 128, 128, 96)
    start = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(image, (64, 64, 64), batch, predictor, overlap=0.5, mode="gaussian")
    return {"seconds": time.perf_counter() - start, "network_calls": calls}


def _peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM). ru_maxrss would include the parent's peak:
    Linux carries it across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(kind: str, *args: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = (
            measure_pipeline(rest[0], rest[1], args.threads)
            if kind == "pipeline"
            else measure_sliding_window(int(rest[0]), args.threads)
        )
        result["peak_rss_gib"] = _peak_rss_gib()
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        package = str(_default_package(folder))
        full, half = _scan(folder, 160), _scan(folder, 80)
        threads = ["--threads", str(args.threads)]
        runs = {
            "pipeline 384x384x160": _child("pipeline", str(full), package, *threads),
            "pipeline 384x384x80": _child("pipeline", str(half), package, *threads),
            "3D sliding window, 8 patches/batch": _child("window", "8", *threads),
            "3D sliding window, per-patch loop": _child("window", "1", *threads),
        }
    print(f"{'run':40s} {'seconds':>8s} {'peak GiB':>9s}  detail")
    for name, run in runs.items():
        detail = run.get("timings_s") or {"network calls": run.get("network_calls")}
        print(f"{name:40s} {run['seconds']:8.1f} {run['peak_rss_gib']:9.2f}  {json.dumps(detail)}")
    full_run, half_run = runs["pipeline 384x384x160"], runs["pipeline 384x384x80"]
    summary = {
        "pipeline_s": round(full_run["seconds"], 2),
        "pipeline_peak_gib": round(full_run["peak_rss_gib"], 2),
        "inference_s_160_over_80_slices": round(
            full_run["timings_s"]["inference"] / half_run["timings_s"]["inference"], 2
        ),
        "sliding_window_batched_s": round(runs["3D sliding window, 8 patches/batch"]["seconds"], 2),
        "sliding_window_per_patch_s": round(runs["3D sliding window, per-patch loop"]["seconds"], 2),
        "per_patch_over_batched": round(
            runs["3D sliding window, per-patch loop"]["seconds"]
            / runs["3D sliding window, 8 patches/batch"]["seconds"],
            2,
        ),
        "threads": args.threads,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
