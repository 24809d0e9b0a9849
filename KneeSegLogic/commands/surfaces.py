"""``kneeseg surfaces SEGMENTATION -o OUT``: smoothed surface models (STL/VTP, LPS mm)."""

from __future__ import annotations

import argparse
from pathlib import Path

from KneeSegLogic.commands import add_output

HELP = "smoothed surface models (STL/VTP, mm) from a segmentation"
# The same names as quantification.surfaces.SMOOTHING_METHODS (not imported here: it loads VTK).
SMOOTHING_METHODS = ("windowed-sinc", "laplacian-idw", "none")
# quantification.surfaces.MESH_RESOLUTION_MM, for the same reason.
MESH_RESOLUTION_MM = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("segmentation", type=Path, help=".seg.nrrd or label volume")
    add_output(parser)
    parser.add_argument(
        "--smoothing",
        default="windowed-sinc",
        choices=SMOOTHING_METHODS,
        help="surface smoothing (default: volume-preserving windowed sinc)",
    )
    parser.add_argument(
        "--decimate",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of triangles to remove by quadric decimation, 0 to <1 (default 0)",
    )
    parser.add_argument(
        "--resolution-mm",
        type=float,
        default=MESH_RESOLUTION_MM,
        metavar="MM",
        help="mesh resolution: voxels finer than this are merged in blocks of about MM before the "
        f"surface is built, keeping the sub-voxel boundary and the volume (default {MESH_RESOLUTION_MM:g}; "
        "0: one face per voxel face)",
    )
    parser.add_argument("--structures", help="comma-separated structure keys or label values (default: all present)")


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.quantification.surfaces import (
        SurfaceOptions,
        surfaces_from_segmentation,
    )

    options = SurfaceOptions(
        smoothing=args.smoothing,
        decimate=args.decimate,
        structures=args.structures,
        overwrite=args.overwrite,
        resolution_mm=args.resolution_mm,
    )
    surfaces_from_segmentation(args.segmentation, args.output, options)
    return 0
