"""The whole ``segment`` on large synthetic knees: per-stage seconds, peak memory, output size,
the code path before the fusion/writing/post-processing rework against the current one, in one run.

Scans are synthesised from the bundled label map (``Resources/SampleData/knee_labels.nrrd``, 384 x
384 x 160 at 0.36 x 0.36 x 0.7 mm) with :func:`KneeSegLogic.training.phantom.synthesize_mese`
(echo 2 of a MESE train, SNR 30), resampled (nearest) onto the grids below over the same field of
view, so every scan shows the same knee:

- ``512x512x286``: 0.27 x 0.27 x 0.39 mm (75 M voxels), the size of a 3D knee protocol;
- ``384x384x160``: the label map's own grid;
- ``384x384x80/160/320`` for the scaling table (slices 1.4 / 0.7 / 0.35 mm).

Each run is ``segment_scan`` with the bundled default model (surfaces and report included) in a
fresh subprocess, so its peak resident memory (VmHWM) is its own. ``old`` is the code path of
commit :data:`BASELINE` (before the rework): its ``segmentation/inference.py``,
``uncertainty.py``, ``postprocess.py``, ``calibration.py`` and ``pipeline/segment.py`` are read
with ``git show`` into modules that replace the current ones in that subprocess only; everything
else is the current code. The machine's load average is printed with every run: on shared cores
compare the ratios of one run, not absolute seconds.

Also measured: gzip level 1 against 6 for the segmentation file and the (quantised) uncertainty
map of the largest scan.

    nice -n 10 python benchmarks/pipeline.py [--threads 2] [--sizes 512x512x286,384x384x160]
        [--scaling 80,160,320] [--variants old,new] [--device cpu] [--baseline COMMIT]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "Resources" / "SampleData" / "knee_labels.nrrd"

#: The commit whose fusion, uncertainty, post-processing and writing ``old`` runs.
BASELINE = os.environ.get(BASELINE_VARIABLE := "KNEESEG_BENCHMARK_BASELINE", "416dcef3bb3ec71aa2a973c8b1115e0655a26290")

#: Modules replaced by their BASELINE version for ``old``, in import order.
OLD_MODULES = (
    ("KneeSegLogic.segmentation.calibration", "KneeSegLogic/segmentation/calibration.py"),
    ("KneeSegLogic.segmentation.uncertainty", "KneeSegLogic/segmentation/uncertainty.py"),
    ("KneeSegLogic.segmentation.postprocess", "KneeSegLogic/segmentation/postprocess.py"),
    ("KneeSegLogic.segmentation.inference", "KneeSegLogic/segmentation/inference.py"),
    ("KneeSegLogic.pipeline.segment", "KneeSegLogic/pipeline/segment.py"),
)

STAGES = ("inference", "fusion", "postprocessing", "write", "surfaces", "report")


def _baseline_commit() -> str:
    """The full hash of :data:`BASELINE` (the abbreviated form is accepted by git show too)."""
    return subprocess.run(
        ["git", "rev-parse", BASELINE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _install_old_modules(folder: Path) -> None:
    """Replace the current modules by their BASELINE versions (this process only)."""
    for name, path in OLD_MODULES:
        source = subprocess.run(
            ["git", "show", f"{BASELINE}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        file = folder / (name.replace(".", "_") + ".py")
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        setattr(importlib.import_module(parent), child, module)
        spec.loader.exec_module(module)
    # Post-processing steps added after BASELINE (the anatomical consistency rules the shipped
    # package now names) run as the current code has them, so both variants do the same work.
    current = importlib.util.spec_from_file_location(
        "kneeseg_current_postprocess", ROOT / "KneeSegLogic/segmentation/postprocess.py"
    )
    assert current is not None and current.loader is not None
    steps = importlib.util.module_from_spec(current)
    sys.modules[current.name] = steps
    current.loader.exec_module(steps)
    old = sys.modules["KneeSegLogic.segmentation.postprocess"]
    for step, function in steps.STEPS.items():
        old.STEPS.setdefault(step, function)


def _grid_scan(folder: Path, shape: tuple[int, int, int]) -> Path:
    """A synthetic echo-2 MESE knee on a (k, j, i) ``shape`` grid over the label map's field of view."""
    import numpy as np

    from KneeSegLogic.io.scans import read_volume, write_volume
    from KneeSegLogic.io.volume import Volume, resample_to_grid
    from KneeSegLogic.training.phantom import synthesize_mese

    path = folder / f"knee_{shape[2]}x{shape[1]}x{shape[0]}.nrrd"
    if path.exists():
        return path
    labels = read_volume(LABELS)
    extent = np.asarray(labels.size) * np.asarray(labels.spacing)  # (i, j, k) mm
    size = np.asarray(shape[::-1])
    spacing = extent / size
    # Keep the outer corner of the field of view where it is.
    origin = np.asarray(labels.origin) + labels.direction @ ((spacing - np.asarray(labels.spacing)) / 2)
    grid = Volume(np.zeros(shape, np.uint8), tuple(spacing), tuple(origin), labels.direction)
    if shape != labels.array.shape:
        labels = resample_to_grid(labels, grid, is_label=True)
    image = synthesize_mese(labels, echo_times_ms=(10.0, 20.0), snr=30).image.echo(1)
    write_volume(image.with_array(image.array.astype(np.float32)), path)
    return path


def _folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _peak_resident_kb() -> int:
    """VmHWM of this process (reset by exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _StageClock:
    """A progress stream that notes when each stage first reports (perf_counter seconds)."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.first.setdefault(json.loads(line)["stage"], time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass


def measure(variant: str, scan: str, out: str, threads: int, device: str) -> dict:
    """One whole ``segment`` run (called in a fresh subprocess)."""
    import torch

    torch.set_num_threads(threads)
    if variant == "old":
        _install_old_modules(Path(tempfile.mkdtemp(prefix="kneeseg-old-")))
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline import segment

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    volume = read_volume(scan)
    read_s = time.perf_counter() - start
    results = Results("benchmark")
    clock = _StageClock()
    start = time.perf_counter()
    segment.segment_scan(
        volume, Path(out), segment.SegmentOptions(device=device), results=results, progress=Progress(clock)
    )
    end = time.perf_counter()
    total = end - start
    return {
        "variant": variant,
        "scan": Path(scan).name,
        "voxels": int(volume.array.size),
        "read_s": round(read_s, 2),
        "segment_s": round(total, 2),
        # From fusion's start to the end: what the budget compares with inference's own time.
        "after_inference_s": round(end - clock.first.get("fusion", end), 2),
        "stages_s": {k: round(v, 2) for k, v in results["timings_s"].items() if k in STAGES},
        "peak_memory_gb": round(_peak_resident_kb() / 1e6, 2),
        "output_mb": round(_folder_megabytes(Path(out)), 1),
        "files_mb": {
            p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(Path(out).iterdir()) if p.suffix == ".nrrd"
        },
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _run_child(variant: str, scan: Path, out: Path, threads: int, device: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, str(scan), str(out), str(threads), device]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"variant": variant, "scan": scan.name, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_labels(old_folder: Path, new_folder: Path) -> dict:
    """Dice per structure and the symmetric 95th-percentile surface distance (mm) between two runs."""
    import numpy as np
    from scipy import ndimage

    from KneeSegLogic.io.segfile import read_segmentation
    from KneeSegLogic.tissues import BY_LABEL

    old, _ = read_segmentation(old_folder / "segmentation.seg.nrrd")
    new, _ = read_segmentation(new_folder / "segmentation.seg.nrrd")
    spacing = old.spacing_kji
    result = {"voxels_equal": round(float(np.mean(old.array == new.array)), 6), "structures": {}}
    for value in sorted(set(np.unique(old.array)) | set(np.unique(new.array))):
        if value == 0:
            continue
        a, b = old.array == value, new.array == value
        dice = 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
        entry = {"dice": round(float(dice), 5)}
        if a.any() and b.any() and not np.array_equal(a, b):
            box = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in ndimage.find_objects((a | b).view(np.uint8))[0])
            a, b = a[box], b[box]
            surface_a = a & ~ndimage.binary_erosion(a)
            surface_b = b & ~ndimage.binary_erosion(b)
            to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
            to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
            entry["hd95_mm"] = round(float(np.percentile(np.concatenate([to_a, to_b]), 95)), 3)
            entry["assd_mm"] = round(float(np.mean(np.concatenate([to_a, to_b]))), 4)
        else:
            entry["hd95_mm"] = entry["assd_mm"] = 0.0
        result["structures"][BY_LABEL[int(value)].key] = entry
    return result


def compare_uncertainty(old_folder: Path, new_folder: Path) -> dict:
    """How the new masked, quantised uncertainty map differs from the old foreground map (the old
    path's ``uncertainty.nrrd`` when its baseline already wrote the masked map there)."""
    import numpy as np

    from KneeSegLogic.io.scans import read_volume

    foreground = old_folder / "uncertainty_foreground.nrrd"
    old = read_volume(foreground if foreground.exists() else old_folder / "uncertainty.nrrd").array
    new = read_volume(new_folder / "uncertainty.nrrd").array
    difference = np.abs(old - new)
    return {"max_abs": round(float(difference.max()), 5), "share_over_half_step": float(np.mean(difference > 5.01e-4))}


def compression(folder: Path) -> dict:
    """Seconds and MB of the segmentation and uncertainty files at gzip levels 1 and 6."""
    import slicerio

    from KneeSegLogic.io.scans import read_volume, write_volume

    rows = {}
    segmentation = slicerio.read_segmentation(str(folder / "segmentation.seg.nrrd"))
    uncertainty = read_volume(folder / "uncertainty.nrrd")
    with tempfile.TemporaryDirectory() as scratch:
        for level in (1, 6):
            path = Path(scratch) / f"seg{level}.seg.nrrd"
            start = time.perf_counter()
            slicerio.write_segmentation(str(path), segmentation, compression_level=level)
            rows[f"segmentation gzip {level}"] = (time.perf_counter() - start, path.stat().st_size / 1e6)
            path = Path(scratch) / f"u{level}.nrrd"
            start = time.perf_counter()
            write_volume(uncertainty, path, compression_level=level)
            rows[f"uncertainty gzip {level}"] = (time.perf_counter() - start, path.stat().st_size / 1e6)
    return {name: {"seconds": round(s, 2), "mb": round(mb, 2)} for name, (s, mb) in rows.items()}


def _table(rows: list[dict]) -> str:
    # "after inference": wall time from fusion's start to the end (the stages no longer add up:
    # writing runs on a thread beside the surfaces and report).
    header = ["scan", "variant", *STAGES, "segment s", "after inference s", "peak GB", "out MB", "load"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['scan']} | {row['variant']} | error: {row['error']}")
            continue
        stages = [f"{row['stages_s'].get(s, 0):.2f}" for s in STAGES]
        load = "-".join(f"{v:.1f}" for v in row["load_average"])
        lines.append(
            " | ".join(
                [
                    row["scan"],
                    row["variant"],
                    *stages,
                    f"{row['segment_s']:.1f}",
                    f"{row['after_inference_s']:.1f}",
                    f"{row['peak_memory_gb']:.2f}",
                    f"{row['output_mb']:.1f}",
                    load,
                ]
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="512x512x286,384x384x160", help="i x j x k grids (empty: none)")
    parser.add_argument("--scaling", default="80,160,320", help="slice counts on 384 x 384 (empty: none)")
    parser.add_argument("--variants", default="old,new")
    parser.add_argument("--device", default="cpu", help="device of the runs (cpu, cuda)")
    parser.add_argument("--keep", type=Path, default=None, help="folder for scans and outputs (default: temporary)")
    parser.add_argument(
        "--baseline", help="commit whose modules 'old' runs (default: the rework's baseline); children inherit it"
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, scan, out, threads, device = args.child
        print(json.dumps(measure(variant, scan, out, int(threads), device)))
        return
    if args.baseline:
        global BASELINE
        BASELINE = os.environ[BASELINE_VARIABLE] = args.baseline
    _baseline_commit()  # fails early when the baseline is not in this clone
    variants = [v for v in args.variants.split(",") if v]
    shapes = [tuple(int(n) for n in s.split("x"))[::-1] for s in args.sizes.split(",") if s]
    scaling = [(int(n), 384, 384) for n in args.scaling.split(",") if n]
    work = args.keep or Path(tempfile.mkdtemp(prefix="kneeseg-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"threads": args.threads, "device": args.device, "baseline": BASELINE, "runs": []}
    for label, grids in (("sizes", shapes), ("scaling", scaling)):
        rows = []
        for shape in grids:
            scan = _grid_scan(work, shape)  # type: ignore[arg-type]
            outputs = {}
            for variant in variants:
                out = work / f"{scan.stem}_{variant}"
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                row = _run_child(variant, scan, out, args.threads, args.device)
                rows.append(row)
                outputs[variant] = out
                print(json.dumps(row), flush=True)
            if label == "sizes" and {"old", "new"} <= set(outputs) and all("error" not in r for r in rows[-2:]):
                agreement = {
                    "scan": scan.name,
                    "labels": compare_labels(outputs["old"], outputs["new"]),
                    "uncertainty": compare_uncertainty(outputs["old"], outputs["new"]),
                }
                report.setdefault("agreement", []).append(agreement)
                print(json.dumps(agreement), flush=True)
            if label == "sizes" and shape == shapes[0] and "new" in outputs:
                report["compression"] = compression(outputs["new"])
                print(json.dumps(report["compression"]), flush=True)
        report["runs"].append({label: rows})
        if rows:
            print(f"\n{label} ({args.threads} threads, device {args.device}):\n{_table(rows)}\n", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
