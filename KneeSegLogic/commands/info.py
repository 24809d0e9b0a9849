"""``kneeseg info SCAN``: size, spacing, origin, direction and echo times of a scan."""

from __future__ import annotations

import argparse
import json

from KneeSegLogic.commands import add_scan

HELP = "describe a scan: size, spacing, origin, direction, echo times"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scan(parser, "path", "scan: NIfTI/NRRD/MHA file or DICOM folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.io.volume import describe, orientation_code

    volume = read_volume(args.path, args.echo_times)
    info = describe(volume)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.path}")
    print(f"  size (i, j, k)   {info['size']}")
    print(f"  spacing (mm)     {[round(s, 6) for s in info['spacing_mm']]}")
    print(f"  origin (LPS mm)  {[round(o, 4) for o in info['origin_mm']]}")
    print(f"  orientation      {orientation_code(volume)}")
    print(f"  echo times (ms)  {info['echo_times_ms']}")
    print(f"  voxel type       {info['dtype']}")
    return 0
