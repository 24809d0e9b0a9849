"""``kneeseg t2 SCAN -o OUT`` and ``kneeseg t2-change BASELINE FOLLOWUP -o OUT``."""

from __future__ import annotations

import argparse
from pathlib import Path

from KneeSegLogic.commands import add_device, add_output, add_scan, read_scan

HELP = "fit a T2 map from a multi-echo scan; cartilage region statistics"
CHANGE_HELP = "T2 change between two time points, focal lesion clusters"
# The same names as relaxometry's models and the regions recipes (not imported: that loads torch).
T2_MODELS = ("loglinear", "mono", "mono-offset", "ncexp")
REGION_RECIPES = ("dosma", "thomas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scan(parser, "input", "multi-echo DICOM folder, or 4D NIfTI/NRRD with --echo-times")
    add_output(parser)
    parser.add_argument(
        "--mask", type=Path, help="segmentation (.seg.nrrd or label volume) limiting the fit and giving regions"
    )
    parser.add_argument(
        "--model", default="ncexp", choices=T2_MODELS, help="signal model (default: noise-corrected mono-exponential)"
    )
    parser.add_argument(
        "--keep-first-echo",
        action="store_true",
        help="fit echo 1 too (skipped by default: stimulated echoes make it wrong in spin-echo trains)",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        help="noise SD per receiver channel for ncexp, in signal units (default: from the image background)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="receiver channels of the magnitude combination, for ncexp (default 1: Rician)",
    )
    parser.add_argument("--min-r2", type=float, help="reject voxels whose fit R^2 is lower (DOSMA uses 0.9)")
    parser.add_argument("--regions", choices=REGION_RECIPES, help="femoral subregion recipe (default: dosma)")
    add_device(parser)


def add_change_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("baseline", type=Path, help="output folder of `kneeseg t2`/`segment` at baseline")
    parser.add_argument("followup", type=Path, help="output folder at follow-up")
    add_output(parser)


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.quantification.t2maps import T2Options, t2_scan

    options = T2Options(
        model=args.model,
        skip_first_echo=not args.keep_first_echo,
        sigma=args.sigma,
        channels=args.channels,
        min_r2=args.min_r2,
        regions=args.regions,
        device=args.device,
        overwrite=args.overwrite,
    )
    progress, results = Progress(), Results("t2")
    volume = read_scan(args.input, args.echo_times, results, progress)
    t2_scan(volume, args.output, options, scan_path=args.input, mask_path=args.mask, results=results, progress=progress)
    return 0


def run_change(args: argparse.Namespace) -> int:
    from KneeSegLogic.quantification.longitudinal import t2_change_folders

    t2_change_folders(args.baseline, args.followup, args.output, overwrite=args.overwrite)
    return 0
