"""The ``kneeseg`` command line: one small module per command.

Each command module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. ``run``
turns the parsed arguments into the typed options object of the library function it calls and
calls that one function; the library does the work. Command modules import the library inside
``run`` so that ``kneeseg --help`` and light commands do not pay for torch, MONAI and VTK.
This module holds the argument helpers the commands share.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.io.volume import Volume

#: Devices as the commands accept them (see :func:`KneeSegLogic.device.select_device`).
DEVICES = ("auto", "cpu", "cuda")


def echo_times_argument(text: str) -> list[float]:
    """``--echo-times 10,20,30`` -> ``[10.0, 20.0, 30.0]`` (ms), or a usage error."""
    from KneeSegLogic.io.checks import parse_echo_times

    try:
        return parse_echo_times(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_scan(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    """A scan argument and the ``--echo-times`` a 4D file without them in its header needs."""
    parser.add_argument(name, type=Path, help=help_text)
    parser.add_argument(
        "--echo-times", type=echo_times_argument, help="echo times in ms (comma-separated) for a 4D file"
    )


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="output folder (written as OUT.partial, renamed when complete)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help="compute device (auto: CUDA when present)")


def read_scan(path: Path, echo_times_ms: Sequence[float] | None, results: Results, progress: Progress) -> Volume:
    """Read and check the scan once, timed as stage ``read``.

    The progress line comes only after a successful read, so bad input prints nothing on stdout
    and one line on stderr.
    """
    from KneeSegLogic.io.scans import read_volume

    with results.stage("read"):
        volume = read_volume(path, echo_times_ms)
    progress("read", 1.0, f"{path}: size {volume.size}, spacing {tuple(round(s, 4) for s in volume.spacing)} mm")
    return volume
