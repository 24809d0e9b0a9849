"""``kneeseg segment SCAN -o OUT`` and ``kneeseg demo -o OUT``."""

from __future__ import annotations

import argparse

from KneeSegLogic.commands import add_device, add_output, add_scan, read_scan

HELP = "segment bones, cartilage and menisci; uncertainty, surfaces, report"
DEMO_HELP = "run the main job on the bundled sample"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scan(parser, "input", "scan: NIfTI/NRRD/MHA file or DICOM folder (multi-echo accepted)")
    add_output(parser)
    parser.add_argument("--model", help="model package id or folder (default: the bundled default model)")
    add_device(parser)
    parser.add_argument("--no-surfaces", action="store_true", help="skip surface models")
    parser.add_argument(
        "--closing-radius", type=float, default=None, help="closing radius in mm (default: from the model package)"
    )
    parser.add_argument("--members", type=int, default=0, help="use the first N ensemble members (0: all)")
    parser.add_argument(
        "--flip-tta", action="store_true", help="also predict the left-right mirrored scan and average (2x time)"
    )
    parser.add_argument(
        "--regions",
        choices=["dosma", "thomas"],
        default=None,
        help="femoral subregion recipe for multi-echo T2 (default: dosma)",
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_output(parser)
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.pipeline.segment import SegmentOptions, segment_scan

    options = SegmentOptions(
        model=args.model,
        device=args.device,
        members=args.members,
        flip_tta=args.flip_tta,
        closing_radius_mm=args.closing_radius,
        surfaces=not args.no_surfaces,
        regions=args.regions,
        overwrite=args.overwrite,
    )
    progress, results = Progress(), Results("segment")
    volume = read_scan(args.input, args.echo_times, results, progress)
    segment_scan(volume, args.output, options, scan_path=args.input, results=results, progress=progress)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled sample: segmentation, uncertainty, T2 with regions, surfaces, report."""
    from KneeSegLogic.errors import KneeSegError
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.pipeline.segment import SegmentOptions, segment_scan
    from KneeSegLogic.resources import DEMO_SCAN

    if not DEMO_SCAN.exists():
        raise KneeSegError(f"{DEMO_SCAN}: bundled sample missing; reinstall KneeSeg from a full clone")
    progress, results = Progress(), Results("demo")
    volume = read_scan(DEMO_SCAN, None, results, progress)
    options = SegmentOptions(device=args.device, overwrite=args.overwrite)
    segment_scan(volume, args.output, options, scan_path=DEMO_SCAN, results=results, progress=progress)
    return 0
