"""Benchmark: every T2 method, timed and scored on the same voxels in one run.

Two voxel sets, each fitted by every method:

* **synthetic** (known truth): CPMG trains simulated with the extended phase graph
  (:func:`KneeSegLogic.quantification.epg.cpmg_echoes`) at the real scan's 8 echo times
  (6.3-50.5 ms), T2 uniform 20-70 ms, refocusing angle uniform 120-180 degrees (B1 0.67-1),
  S0 1000, Rician noise SD 10, plus pure-noise air voxels. Stimulated echoes make the train
  non-exponential, as on a real scanner; the error is each method's T2 minus the true T2.
* **real**: the cartilage voxels (labels 1-4) of the real MESE knee in ``../shared/data``
  (``mese_t2_knee_pymskt``, 24 x 256 x 256 x 8), as segmented by the bundled default model (or
  ``--labels``). There is no truth, so each method is compared voxel by voxel with DOSMA's fit.

Methods: DOSMA 0.1.2's own ``MonoExponentialFit(tc0="polyfit")`` run in its virtual
environment (``--dosma-python``, default ``/work/dosma-venv/bin/python``) as a subprocess on the
same arrays (its row is skipped, with a note, when that interpreter or DOSMA is missing);
``scipy.optimize.curve_fit`` per voxel written the DOSMA way (polyfit start, ``maxfev=100``,
``ftol=1e-5``; on a random sample, time scaled to all voxels); and KneeSeg's ``loglinear``,
``mono``, ``ncexp`` (echo 1 skipped: the default; and all echoes) and ``epg`` (all echoes, T2,
S0 and B1 fitted). Every method on one CPU thread; times are CPU seconds (``time.process_time``,
best of ``--repeats``; the machines here are shared, so wall time says little), for KneeSeg the
whole call; sigma for ``ncexp``/``epg`` is estimated once from the air/background beforehand.
Errors and differences are taken over voxels where both values are valid statistics values
(:func:`KneeSegLogic.quantification.regions.valid_relaxation`: finite, in (0, 100] ms).

Run from the repository root: ``nice -n 10 python benchmarks/t2_fit.py`` (about 2-4 CPU minutes).
Prints one table per voxel set and, as the last line, one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from scipy.optimize import OptimizeWarning, curve_fit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from KneeSegLogic.quantification.epg import cpmg_echoes, echo_spacing_ms, fit_epg
from KneeSegLogic.quantification.regions import valid_relaxation
from KneeSegLogic.quantification.relaxometry import estimate_noise_sigma, fit_t2
from KneeSegLogic.tissues import tissues_in_group
from KneeSegLogic.training.phantom import rician

MESE = REPO.parent / "shared" / "data" / "mese_t2_knee_pymskt"
DOSMA_PYTHON = Path("/work/dosma-venv/bin/python")
#: The fit box for every method: wide, so that no method's values are clipped or dropped at 100 ms.
BOUNDS_MS = (0.0, 1.0e4)
T = TypeVar("T")

# Run inside DOSMA's environment: arrays in, T2 and CPU seconds out (DOSMA's public fitting API).
DOSMA_SCRIPT = """
import sys, time, numpy as np
from dosma.core.med_volume import MedicalVolume
from dosma.core.fitting import MonoExponentialFit
data = np.load(sys.argv[1])
signal, te = data["signal"].astype(np.float64), data["te"]
volumes = [MedicalVolume(signal[:, e].reshape(-1, 1, 1), np.eye(4)) for e in range(signal.shape[1])]
fitter = MonoExponentialFit(bounds=tuple(data["bounds"]), tc0="polyfit", r2_threshold=0,
                            decimal_precision=None, num_workers=0, verbose=False)
best = float("inf")
for _ in range(int(sys.argv[3])):
    start = time.process_time()
    t2, _ = fitter.fit(te, volumes)
    best = min(best, time.process_time() - start)
np.savez(sys.argv[2], t2=np.asarray(t2.volume).ravel(), seconds=best)
"""


def best_cpu_time(function: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Least CPU time (s) of ``repeats`` calls of ``function`` in this process, and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = function()
        best = min(best, time.process_time() - start)
    return best, result  # type: ignore[return-value]


def synthetic_voxels(
    echo_times: np.ndarray, voxels: int, air: int, sigma: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPG CPMG signal (voxels + air, echoes), true T2 (ms) of the tissue voxels, tissue mask."""
    rng = np.random.default_rng(seed)
    spacing = echo_spacing_ms(echo_times)
    t2 = rng.uniform(20.0, 70.0, voxels)
    b1 = rng.uniform(120.0, 180.0, voxels) / 180.0
    echoes, _, _ = cpmg_echoes(torch.tensor(spacing / t2), torch.tensor(b1), echo_times.size, spacing, 1000.0, 180.0)
    clean = np.concatenate([1000.0 * echoes.T.numpy(), np.zeros((air, echo_times.size))])
    tissue = np.arange(voxels + air) < voxels
    return rician(clean, sigma, rng).astype(np.float32), t2, tissue


def real_voxels(labels_path: Path | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Cartilage signal (voxels, echoes), echo times (ms) and background sigma of the MESE scan."""
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.io.segfile import read_labels

    scan = read_volume(MESE)
    if labels_path is not None:
        labels = read_labels(labels_path, reference=scan.echo(0))
    else:
        from KneeSegLogic.io.outputs import Progress, Results
        from KneeSegLogic.pipeline.segment import segment_volume
        from KneeSegLogic.segmentation.registry import get_package

        labels, _, _ = segment_volume(scan, get_package(), torch.device("cpu"), Results("segment"), Progress(None))
    cartilage = np.isin(labels.array, [t.label for t in tissues_in_group("cartilage")])
    sigma = estimate_noise_sigma(scan.array[..., 1:])
    assert scan.echo_times_ms is not None  # read_volume gives a multi-echo DICOM series its times
    return scan.array[cartilage].astype(np.float32), np.asarray(scan.echo_times_ms), sigma


def dosma_fit(python: Path, signal: np.ndarray, echo_times: np.ndarray, repeats: int) -> tuple[float, np.ndarray] | str:
    """DOSMA's MonoExponentialFit in its own interpreter: (CPU s, T2 ms), or why it could not run."""
    if not python.is_file():
        return f"no DOSMA interpreter at {python} (--dosma-python)"
    with tempfile.TemporaryDirectory() as folder:
        given, result = Path(folder) / "in.npz", Path(folder) / "out.npz"
        np.savez(given, signal=signal, te=echo_times, bounds=np.asarray(BOUNDS_MS))
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        run = subprocess.run(
            [str(python), "-c", DOSMA_SCRIPT, str(given), str(result), str(repeats)],
            capture_output=True,
            text=True,
            env=environment,
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no message"])[-1]
            return f"DOSMA did not run ({last})"
        with np.load(result) as out:
            return float(out["seconds"]), out["t2"].astype(np.float64)


def curve_fit_per_voxel(signal: np.ndarray, echo_times: np.ndarray) -> np.ndarray:
    """T2 (ms) per voxel the DOSMA way: polyfit start, curve_fit(a exp(b x)), maxfev 100, ftol 1e-5."""

    def model(x: np.ndarray, a: float, b: float) -> np.ndarray:
        return a * np.exp(b * x)

    t2 = np.full(len(signal), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        for v, y in enumerate(signal.astype(np.float64)):
            slope, intercept = np.polyfit(echo_times, np.log(np.maximum(y, 1e-3)), 1)
            try:
                (_, b), _ = curve_fit(model, echo_times, y, p0=(np.exp(intercept), slope), maxfev=100, ftol=1e-5)
            except RuntimeError:  # no convergence within maxfev
                continue
            t2[v] = -1.0 / b
    return t2


def compare(estimate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Median |difference|, median and mean difference (ms) where both are valid; valid fraction."""
    both = valid_relaxation(estimate) & valid_relaxation(reference)
    difference = estimate[both] - reference[both]
    return {
        "median_abs_ms": float(np.median(np.abs(difference))) if both.any() else float("nan"),
        "median_ms": float(np.median(difference)) if both.any() else float("nan"),
        "mean_ms": float(np.mean(difference)) if both.any() else float("nan"),
        "valid_fraction": float(valid_relaxation(estimate).mean()),
    }


KNEESEG_METHODS: dict[str, dict[str, Any]] = {
    "KneeSeg loglinear, echoes 1-8": {"model": "loglinear", "skip_first_echo": False},
    "KneeSeg mono, echoes 1-8": {"model": "mono", "skip_first_echo": False},
    "KneeSeg ncexp, echoes 2-8 (default)": {"model": "ncexp"},
    "KneeSeg ncexp, echoes 1-8": {"model": "ncexp", "skip_first_echo": False},
    "KneeSeg epg, echoes 1-8 (+B1)": {"model": "epg"},  # fit_epg uses every echo
}


def run_methods(
    signal: np.ndarray,
    echo_times: np.ndarray,
    fitted: np.ndarray,
    sigma: float,
    sample: np.ndarray,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], str | None]:
    """Every method on ``signal[fitted]``: rows with CPU seconds (all fitted voxels) and T2 (ms)."""
    voxels = int(fitted.sum())
    rows: list[dict[str, Any]] = []
    dosma = dosma_fit(args.dosma_python, signal[fitted], echo_times, 1)
    note = dosma if isinstance(dosma, str) else None
    if not isinstance(dosma, str):
        rows.append({"method": "DOSMA MonoExponentialFit (polyfit start)", "seconds": dosma[0], "t2": dosma[1]})
    seconds, t2_sample = best_cpu_time(lambda: curve_fit_per_voxel(signal[fitted][sample], echo_times), 1)
    rows.append(
        {
            "method": f"scipy curve_fit per voxel ({sample.size} sampled)",
            "seconds": seconds / sample.size * voxels,
            "t2_sample": t2_sample,
        }
    )
    for name, options in KNEESEG_METHODS.items():
        model = options["model"]
        noise = {"sigma": sigma} if model in ("ncexp", "epg") else {}
        if model == "epg":
            repeats = 1  # about 100x slower than the others: one run keeps the benchmark short

            def fit(noise: dict[str, Any] = noise) -> Any:
                return fit_epg(signal, echo_times, mask=fitted, t2_bounds_ms=BOUNDS_MS, **noise)
        else:
            repeats = args.repeats

            def fit(options: dict[str, Any] = options, noise: dict[str, Any] = noise) -> Any:
                return fit_t2(signal, echo_times, mask=fitted, t2_bounds_ms=BOUNDS_MS, **options, **noise)

        seconds, result = best_cpu_time(fit, repeats)
        rows.append({"method": name, "seconds": seconds, "t2": result.t2_ms[fitted].astype(np.float64)})
    return rows, note


def table(
    title: str, rows: list[dict[str, Any]], sample: np.ndarray, truth: np.ndarray | None, note: str | None
) -> list[dict[str, Any]]:
    """Print one voxel set's table; return its rows as JSON-ready dicts (no arrays)."""
    dosma = next((r for r in rows if r["method"].startswith("DOSMA")), None)
    reference_name = "DOSMA" if dosma is not None else "curve_fit"
    reference_seconds = dosma["seconds"] if dosma is not None else rows[0]["seconds"]
    print(f"\n{title}")
    if note:
        print(f"  (DOSMA row skipped: {note})")
    header = f"{'method':44s} {'CPU s':>8s} {'x ' + reference_name:>12s}"
    if truth is not None:
        header += f" {'median |err|':>13s} {'mean bias':>10s}"
    if dosma is not None:
        header += f" {'median |dT2| vs DOSMA':>22s} {'median dT2':>11s}"
    header += f" {'valid':>7s}"
    print(header)
    print("-" * len(header))
    out = []
    for row in rows:
        sampled = "t2_sample" in row
        estimate = row["t2_sample"] if sampled else row["t2"]
        line = f"{row['method']:44s} {row['seconds']:8.3f} {reference_seconds / row['seconds']:12.1f}"
        record: dict[str, Any] = {"method": row["method"], "cpu_seconds": round(row["seconds"], 4)}
        if truth is not None:
            error = compare(estimate, truth[sample] if sampled else truth)
            line += f" {error['median_abs_ms']:13.3f} {error['mean_ms']:+10.3f}"
            record |= {"median_abs_error_ms": round(error["median_abs_ms"], 4), "bias_ms": round(error["mean_ms"], 4)}
        if dosma is not None:
            against = compare(estimate, dosma["t2"][sample] if sampled else dosma["t2"])
            line += f" {against['median_abs_ms']:22.4f} {against['median_ms']:+11.4f}"
            record["median_abs_vs_dosma_ms"] = round(against["median_abs_ms"], 4)
        valid = compare(estimate, estimate)["valid_fraction"]
        print(line + f" {valid:7.1%}")
        out.append(record | {"valid_fraction": round(valid, 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=20_000, help="synthetic tissue voxels")
    parser.add_argument("--air", type=int, default=5_000, help="synthetic pure-noise voxels (sigma estimate)")
    parser.add_argument("--sigma", type=float, default=10.0, help="synthetic Rician noise SD (S0 = 1000)")
    parser.add_argument("--sample", type=int, default=1000, help="voxels fitted by the per-voxel curve_fit")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the fast methods")
    parser.add_argument("--labels", type=Path, help="segmentation of the MESE scan (default: segment it now)")
    parser.add_argument("--dosma-python", type=Path, default=DOSMA_PYTHON, help="python of a DOSMA environment")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed + 1)
    report: dict[str, Any] = {"benchmark": "t2_fit"}

    if MESE.is_dir():
        real_signal, echo_times, real_sigma = real_voxels(args.labels)
    else:
        real_signal, echo_times, real_sigma = None, 6.312 * np.arange(1, 9), float("nan")
        print(f"(real MESE rows skipped: {MESE} not found)")

    signal, truth, tissue = synthetic_voxels(echo_times, args.voxels, args.air, args.sigma, args.seed)
    sigma = estimate_noise_sigma(signal[:, 1:])
    fit_t2(signal[:500], echo_times, model="mono")  # warm-up (noise-floor table, kernels)
    sample = np.sort(rng.choice(args.voxels, min(args.sample, args.voxels), replace=False))
    rows, note = run_methods(signal, echo_times, tissue, sigma, sample, args)
    report["synthetic"] = table(
        f"Synthetic CPMG (EPG) voxels: {args.voxels:,} tissue + {args.air:,} air, {echo_times.size} echoes "
        f"{echo_times[0]:.1f}-{echo_times[-1]:.1f} ms, T2 U(20, 70) ms, refocusing U(120, 180) deg, "
        f"Rician sigma {args.sigma:g} (estimated {sigma:.2f}); errors against the true T2 (ms)",
        rows,
        sample,
        truth,
        note,
    )

    if real_signal is not None:
        voxels = len(real_signal)
        # The background of the scan stands in for the synthetic air: sigma is given, not estimated.
        fitted = np.ones(voxels, bool)
        sample = np.sort(rng.choice(voxels, min(args.sample, voxels), replace=False))
        rows, note = run_methods(real_signal, echo_times, fitted, real_sigma, sample, args)
        report["real"] = table(
            f"Real MESE cartilage: {voxels:,} voxels (labels 1-4), {echo_times.size} echoes, background sigma "
            f"{real_sigma:.2f}; differences against DOSMA's T2 (ms)",
            rows,
            sample,
            None,
            note,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
