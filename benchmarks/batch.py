"""Throughput of ``kneeseg batch`` on a local Dask cluster: cases per hour with 1 and 2 workers.

Builds, like Testing/pipeline/test_batch.py, an untrained one-member 2.5D model package (so the numbers
measure the batch machinery and a small network, not a real model) and N small single-echo
cases cropped from the bundled sample scan, then runs ``kneeseg batch`` in a fresh process with
``--workers 1`` and ``--workers 2``. Reported per run: wall time, cases per hour, the mean
seconds a case takes inside its worker (summary.csv), and the per-case overhead = wall time x
workers / cases - mean case seconds (scheduling, start-up of the cluster and of each worker's
imports, spread over the cases). Run with ``nice -n 10 python3 benchmarks/batch.py [N]``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.package import save_package
from KneeSegLogic.tissues import TISSUES

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "mese_t2_knee.nrrd"


def tiny_package(folder: Path) -> Path:
    torch.manual_seed(0)
    architecture = {
        "name": "monai.UNet",
        "args": {
            "spatial_dims": 2,
            "in_channels": 3,
            "out_channels": 1 + len(TISSUES),
            "channels": [4, 8],
            "strides": [2],
        },
    }
    member = {
        "name": "only",
        "weight": 1.0,
        "architecture": architecture,
        "input": {
            "kind": "2.5d",
            "plane": "sagittal",
            "context_slices": 1,
            "spacing_mm": [2.5, 2.5],
            "slice_spacing_mm": 4.0,
            "normalisation": {"name": "percentile", "low": 1, "high": 99},
        },
    }
    spec = {
        "id": "tiny-bench",
        "version": "0.0.1",
        "description": "untrained, for benchmarks",
        "license": "Apache-2.0",
        "labels": {str(t.label): t.key for t in TISSUES},
        "members": [member],
        "postprocessing": [],
    }
    state = build_network(architecture["name"], architecture["args"]).state_dict()
    save_package(folder, spec, [state])
    return folder


def write_cases(folder: Path, count: int) -> None:
    echo = read_volume(SAMPLE).echo(1)
    folder.mkdir()
    for n in range(count):
        k0, j0 = 2 + n % 8, 10 + (3 * n) % 50
        array = np.ascontiguousarray(echo.array[k0 : k0 + 12, j0 : j0 + 48, 30:78])
        origin = np.asarray(echo.origin) + echo.direction @ (np.asarray(echo.spacing) * (30, j0, k0))
        write_volume(Volume(array, echo.spacing, tuple(origin), echo.direction), folder / f"case{n:02d}.nrrd")


def run(cases: Path, out: Path, package: Path, workers: int) -> tuple[float, list[float]]:
    command = [sys.executable, "-m", "KneeSegLogic.commands.main", "batch", str(cases), "-o", str(out)]
    command += ["--model", str(package), "--workers", str(workers), "--no-surfaces", "--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"batch failed ({done.returncode}): {done.stderr[-2000:]}")
    if "still alive after" in done.stderr:
        print(f"  warning: workers were killed at shutdown ({workers} workers)")
    with open(out / "summary.csv", newline="") as stream:
        seconds = [float(row["seconds"]) for row in csv.DictReader(stream)]
    return wall, seconds


def main(count: int = 8) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        package = tiny_package(root / "tiny-bench")
        write_cases(root / "cases", count)
        print(f"{count} cases of 12 x 48 x 48 voxels, tiny 2.5D model, CPU, 1 thread per worker")
        print("| workers | wall (s) | cases/hour | mean case (s) | overhead per case (s) |")
        print("|---|---|---|---|---|")
        rates = {}
        for workers in (1, 2):
            wall, seconds = run(root / "cases", root / f"out{workers}", package, workers)
            rates[workers] = count / wall * 3600
            mean = float(np.mean(seconds))
            overhead = wall * workers / count - mean
            print(f"| {workers} | {wall:.1f} | {rates[workers]:.0f} | {mean:.2f} | {overhead:.2f} |")
        print(f"2 workers / 1 worker throughput: {rates[2] / rates[1]:.2f}x (on {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
