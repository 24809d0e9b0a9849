"""``kneeseg t2 SCAN -o OUT`` and ``kneeseg t2-change BASELINE FOLLOWUP -o OUT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from KneeSegLogic.commands import add_console_options, add_device, add_output, add_scan, prepare_device, read_scan

HELP = "fit a T2 map from a multi-echo scan; cartilage region statistics"
CHANGE_HELP = "T2 change between two time points, focal lesion clusters"
# The same names as t2maps.T2_MODELS and the regions recipes (not imported: that loads torch).
T2_MODELS = ("loglinear", "mono", "mono-offset", "ncexp", "epg", "dess")
REGION_RECIPES = ("dosma", "thomas")
REGIONS_HELP = (
    "femoral subregion recipe (dosma, thomas; default dosma), or a region file: a label volume "
    "(every non-zero value a region) or a .json recipe of angles and depth split"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the EPG and DESS models, the partial-volume exclusion and the region file."""
    parser.add_argument("--epg-t1", type=float, help="EPG model: assumed T1 in ms (default 1000)")
    parser.add_argument("--tr", type=float, help="DESS: repetition time in ms (default: DICOM header)")
    parser.add_argument("--flip-angle", type=float, help="DESS: flip angle in degrees (default: DICOM header)")
    parser.add_argument("--dess-t1", type=float, help="DESS: assumed T1 in ms (default 1200)")
    parser.add_argument(
        "--spoiler-area", type=float, help="DESS: spoiler gradient area in mT ms/m (default: GE DICOM tag, else none)"
    )
    parser.add_argument("--spoiler-duration", type=float, help="DESS: spoiler duration in ms (default: DICOM tag)")
    parser.add_argument(
        "--exclude-surface",
        action="store_true",
        help="leave the articular-surface voxel layer (partial volume with fluid) out of region statistics",
    )


def dess_options(args: argparse.Namespace) -> dict:
    """The DESS overrides given on the command line, by DessParameters field name."""
    return {
        "repetition_time_ms": args.tr,
        "flip_angle_deg": args.flip_angle,
        "t1_ms": args.dess_t1,
        "spoiler_area_mt_ms_per_m": args.spoiler_area,
        "spoiler_duration_ms": args.spoiler_duration,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scan(parser, "input", "multi-echo DICOM folder, or 4D NIfTI/NRRD with --echo-times")
    add_output(parser)
    parser.add_argument(
        "--mask", type=Path, help="segmentation (.seg.nrrd or label volume) limiting the fit and giving regions"
    )
    parser.add_argument(
        "--model",
        "--t2-model",
        dest="model",
        default="ncexp",
        choices=T2_MODELS,
        help="signal model (default ncexp: noise-corrected mono-exponential; epg: all echoes with B1; "
        "dess: two-echo DESS formula)",
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
    parser.add_argument("--regions", help=REGIONS_HELP)
    add_model_arguments(parser)
    add_device(parser)
    add_console_options(parser)


def add_change_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("baseline", type=Path, help="output folder of `kneeseg t2`/`segment` at baseline")
    parser.add_argument("followup", type=Path, help="output folder at follow-up")
    add_output(parser)
    parser.add_argument(
        "--regions", help="region file replacing the built-in regions (label volume on the baseline, or .json recipe)"
    )


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.commands.console import T2_STAGES, TerminalProgress, finish, make_progress
    from KneeSegLogic.io.outputs import Results

    # The scan is read and checked before anything imports torch (the device check and the fit
    # modules do), so bad input is refused in the time `kneeseg info` takes, not after 10-18 s.
    progress, results = make_progress(args, T2_STAGES), Results("t2")
    volume = read_scan(args.input, args.echo_times, results, progress)
    notices = prepare_device(args)
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
        dess=dess_options(args),
        epg_t1_ms=args.epg_t1,
        exclude_surface=args.exclude_surface,
    )
    for notice in notices:
        progress("device", 1.0, notice)
    t2_scan(volume, args.output, options, scan_path=args.input, mask_path=args.mask, results=results, progress=progress)
    if not isinstance(progress, TerminalProgress):  # the terminal summary lists them itself
        for warning in results.data["warnings"]:
            print(f"kneeseg t2: warning: {warning}", file=sys.stderr)
    finish(args, progress, results.data, args.output)
    return 0


def run_change(args: argparse.Namespace) -> int:
    from KneeSegLogic.quantification.longitudinal import t2_change_folders

    t2_change_folders(args.baseline, args.followup, args.output, overwrite=args.overwrite, regions=args.regions)
    return 0
