"""``kneeseg segment SCAN -o OUT`` and ``kneeseg demo -o OUT``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from KneeSegLogic.commands import add_console_options, add_device, add_output, add_scan, prepare_device, read_scan
from KneeSegLogic.tissues import TISSUES

if TYPE_CHECKING:
    from KneeSegLogic.pipeline.segment import SegmentOptions

HELP = "segment bones, cartilage and menisci; uncertainty, surfaces, T2, report"
DEMO_HELP = "run the main job on the bundled sample"

#: The ``--format`` choices (the same names as KneeSegLogic.io.export.FORMATS; not imported: the
#: parser is built at every start and export imports numpy).
FORMATS = ("nifti", "dicom-seg")

#: Structure keys ``--roi-subset`` accepts.
STRUCTURES = tuple(t.key for t in TISSUES)

STATISTICS_HELP = (
    "statistics are always computed: volumes (mm^3) and mean uncertainty per structure, cartilage "
    "thickness (mm) and T2 (ms) per region are in OUT/results.json and OUT/regions.csv "
    "(this flag is accepted for TotalSegmentator users and changes nothing)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scan(parser, "input", "scan: NIfTI/NRRD/MHA file or DICOM folder (multi-echo accepted)")
    add_output(parser)
    parser.add_argument("--model", help="model package id or folder (default: the bundled default model)")
    add_device(parser)
    add_run_options(parser)
    parser.add_argument(
        "--closing-radius", type=float, default=None, help="closing radius in mm (default: from the model package)"
    )
    parser.add_argument("--members", type=int, default=0, help="use the first N ensemble members (0: all)")
    parser.add_argument(
        "--flip-tta", action="store_true", help="also predict the left-right mirrored scan and average (2x time)"
    )
    parser.add_argument(
        "--regions",
        default=None,
        help="femoral subregion recipe for T2 (dosma, thomas; default dosma) or a region file (label volume or .json)",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options ``segment`` and ``demo`` share."""
    parser.add_argument("--no-surfaces", action="store_true", help="skip surface models")
    parser.add_argument(
        "--stl", action="store_true", help="also write each surface as binary STL (default: VTP, which Slicer loads)"
    )
    parser.add_argument("--no-report", action="store_true", help="skip report.png and report.html")
    parser.add_argument(
        "--fast", action="store_true", help="only the coarsest ensemble member, no flip TTA (quicker, less exact)"
    )
    parser.add_argument(
        "--roi-subset",
        nargs="+",
        choices=STRUCTURES,
        metavar="STRUCTURE",
        help="keep only these structures in every output (" + ", ".join(STRUCTURES) + ")",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=FORMATS,
        default=[],
        help="also write the label map as NIfTI (segmentation.nii.gz) and/or DICOM SEG referencing the "
        "source series (segmentation.dcm; DICOM input only)",
    )
    parser.add_argument("--statistics", action="store_true", help=STATISTICS_HELP)
    parser.add_argument(
        "--full-uncertainty",
        action="store_true",
        help="write the uncertainty maps everywhere (default: only near predicted structures)",
    )
    add_console_options(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_output(parser)
    add_device(parser)
    add_run_options(parser)


def _options(args: argparse.Namespace, **extra: Any) -> SegmentOptions:
    from KneeSegLogic.pipeline.segment import SegmentOptions

    return SegmentOptions(
        device=args.device,
        surfaces=not args.no_surfaces,
        stl=args.stl,
        overwrite=args.overwrite,
        fast=args.fast,
        roi_subset=tuple(args.roi_subset or ()),
        report=not args.no_report,
        formats=tuple(args.formats),
        full_uncertainty=args.full_uncertainty,
        **extra,
    )


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.commands.console import SEGMENT_STAGES, finish, make_progress
    from KneeSegLogic.io.outputs import Results
    from KneeSegLogic.pipeline.segment import segment_scan
    from KneeSegLogic.segmentation.registry import get_package

    # A wrong --device or --model fails before the scan is read.
    notices = prepare_device(args)
    get_package(args.model)
    options = _options(
        args,
        model=args.model,
        members=args.members,
        flip_tta=args.flip_tta,
        closing_radius_mm=args.closing_radius,
        regions=args.regions,
    )
    progress, results = make_progress(args, SEGMENT_STAGES), Results("segment")
    volume = read_scan(args.input, args.echo_times, results, progress)
    for notice in notices:
        progress("device", 1.0, notice)
    segment_scan(volume, args.output, options, scan_path=args.input, results=results, progress=progress)
    finish(args, progress, results.data, args.output)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled sample: segmentation, uncertainty, T2 with regions, surfaces, report."""
    from KneeSegLogic.commands.console import SEGMENT_STAGES, finish, make_progress
    from KneeSegLogic.errors import KneeSegError
    from KneeSegLogic.io.outputs import Results
    from KneeSegLogic.pipeline.segment import segment_scan
    from KneeSegLogic.resources import DEMO_SCAN

    if not DEMO_SCAN.exists():
        raise KneeSegError(f"{DEMO_SCAN}: bundled sample missing; reinstall KneeSeg from a full clone")
    notices = prepare_device(args)
    progress, results = make_progress(args, SEGMENT_STAGES), Results("demo")
    volume = read_scan(DEMO_SCAN, None, results, progress)
    for notice in notices:
        progress("device", 1.0, notice)
    segment_scan(volume, args.output, _options(args), scan_path=DEMO_SCAN, results=results, progress=progress)
    finish(args, progress, results.data, args.output)
    return 0
