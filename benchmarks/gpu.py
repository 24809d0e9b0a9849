"""Absolute seconds per stage of the whole ``segment`` on a GPU (a few minutes on an H100/H200).

Synthesises the 384x384x160 and 512x512x286 knees of ``benchmarks/pipeline.py`` (same recipe),
then runs ``segment_scan`` with the bundled default model on ``--device`` (default ``cuda``): one
warm-up run on the smaller scan (CUDA context, cuDNN autotuning, model load), then each scan
``--repeats`` times. Inference runs under automatic mixed precision and fusion, entropy and
resampling run in torch on the GPU (see ``KneeSegLogic.segmentation.inference.fuse_and_decide``).
Prints one table row per run and, last, one JSON object. Without CUDA it says so and exits 0
unless ``--device cpu`` is given (which checks the script itself on a CPU machine).

    python benchmarks/gpu.py [--device cuda] [--repeats 2] [--sizes 384x384x160,512x512x286]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("inference", "fusion", "postprocessing", "write", "surfaces", "report")


def _pipeline_module():
    """benchmarks/pipeline.py (its scan synthesis), imported by path: benchmarks is no package."""
    spec = importlib.util.spec_from_file_location("kneeseg_benchmark_pipeline", HERE / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="384x384x160,512x512x286")
    parser.add_argument("--keep", type=Path, default=None, help="folder for scans and outputs (default: temporary)")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (use --device cpu to check the script)")
        return 0
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import SegmentOptions, segment_scan

    pipeline = _pipeline_module()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kneeseg-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(n) for n in s.split("x"))[::-1] for s in args.sizes.split(",") if s]
    scans = [pipeline._grid_scan(work, shape) for shape in shapes]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for number, scan in enumerate([scans[0]] + [s for s in scans for _ in range(args.repeats)]):
        volume = read_volume(scan)
        results = Results("benchmark")
        out = work / f"out_{number}"
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        options = SegmentOptions(device=args.device, overwrite=True)
        segment_scan(volume, out, options, results=results, progress=Progress(None))
        seconds = time.perf_counter() - start
        row = {
            "scan": scan.name,
            "warm_up": number == 0,
            "segment_s": round(seconds, 2),
            "stages_s": {k: round(v, 2) for k, v in results["timings_s"].items() if k in STAGES},
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if args.device.startswith("cuda")
            else None,
        }
        rows.append(row)
        stages = " | ".join(f"{row['stages_s'].get(s, 0):.2f}" for s in STAGES)
        print(
            f"{row['scan']} | {'warm-up' if row['warm_up'] else 'timed'} | {stages} | {row['segment_s']:.2f}",
            flush=True,
        )
    print(json.dumps({"device": device_name, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
