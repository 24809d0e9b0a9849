"""``kneeseg relax SCAN --kind t1rho|t2star|t2 [--times ...] -o OUT``: any relaxation map, one solver."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from KneeSegLogic.commands import add_device, add_output, read_scan
from KneeSegLogic.commands.t2 import REGIONS_HELP, T2_MODELS, add_model_arguments, dess_options

HELP = "fit a T1rho, T2* or T2 map from a scan and its times; cartilage region statistics"

#: The same keys as t2maps.KINDS (not imported: that loads torch).
KINDS = ("t2", "t1rho", "t2star")


def times_argument(text: str) -> list[float]:
    """``--times 0,10,40,80`` -> ms; times >= 0 and increasing (spin-lock times start at 0)."""
    try:
        times = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"times must be comma-separated numbers in ms, got {text!r}") from None
    if len(times) < 2 or any(t < 0 for t in times) or any(b <= a for a, b in zip(times, times[1:])):
        raise argparse.ArgumentTypeError(f"times must be two or more increasing values >= 0 ms, got {text!r}")
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="multi-echo or multi-spin-lock DICOM folder, or a 4D NIfTI/NRRD")
    add_output(parser)
    parser.add_argument("--kind", required=True, choices=KINDS, help="relaxation time to map")
    parser.add_argument(
        "--times",
        type=times_argument,
        help="echo or spin-lock times in ms, comma-separated, one per volume (default: from the DICOM headers)",
    )
    parser.add_argument("--mask", type=Path, help="segmentation limiting the fit and giving regions")
    parser.add_argument(
        "--model", default="ncexp", choices=T2_MODELS, help="signal model (default ncexp; epg and dess for T2 only)"
    )
    parser.add_argument(
        "--skip-first",
        action="store_true",
        help="leave the first time out (the default for --kind t2 only: MESE stimulated echoes)",
    )
    parser.add_argument("--sigma", type=float, help="noise SD per receiver channel (default: from the background)")
    parser.add_argument("--channels", type=int, default=1, help="receiver channels (default 1: Rician)")
    parser.add_argument("--min-r2", type=float, help="reject voxels whose fit R^2 is lower")
    parser.add_argument("--regions", help=REGIONS_HELP)
    add_model_arguments(parser)
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.errors import KneeSegError
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.quantification.t2maps import T2Options, t2_scan

    if args.model in ("epg", "dess") and args.kind != "t2":
        raise KneeSegError(
            f"--model {args.model} maps T2 only; use ncexp, mono, mono-offset or loglinear for {args.kind}"
        )
    options = T2Options(
        model=args.model,
        skip_first_echo=args.skip_first or args.kind == "t2",
        sigma=args.sigma,
        channels=args.channels,
        min_r2=args.min_r2,
        regions=args.regions,
        device=args.device,
        overwrite=args.overwrite,
        kind=args.kind,
        dess=dess_options(args),
        epg_t1_ms=args.epg_t1,
        exclude_surface=args.exclude_surface,
    )
    progress, results = Progress(), Results("relax")
    times = args.times
    # Readers refuse a time of 0 (right for echo trains); spin-lock times start at 0, so a file is
    # read with placeholder times 1..N and the given times replace them.
    placeholder = None if times is None else [float(i + 1) for i in range(len(times))]
    volume = read_scan(args.input, placeholder, results, progress)
    if times is not None:
        if not volume.is_multi_echo or volume.array.shape[3] != len(times):
            raise KneeSegError(f"{args.input}: {len(times)} times given for a scan of shape {volume.array.shape}")
        volume = dataclasses.replace(volume, echo_times_ms=tuple(times))
    t2_scan(volume, args.output, options, scan_path=args.input, mask_path=args.mask, results=results, progress=progress)
    return 0
