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


def add_console_options(parser: argparse.ArgumentParser) -> None:
    """``--quiet``, ``--verbose`` and ``--json-progress`` of the commands that run a pipeline."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("-v", "--verbose", action="store_true", help="print every stage's messages and timings")
    parser.add_argument(
        "--json-progress",
        action="store_true",
        help="progress as one JSON object per line on stdout (the default when stdout is not a terminal)",
    )


def device_argument(text: str) -> str:
    """``--device`` spelled as users do (``gpu``, ``cuda:1``, ``MPS``) -> the normalised name, or a usage error."""
    from KneeSegLogic.device import parse_device

    try:
        return parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--device`` and (``threads``) ``--threads``: torch's CPU threads (default: torch's choice, the cores)."""
    from KneeSegLogic.device import DEVICE_SPELLINGS

    parser.add_argument(
        "--device",
        default="auto",
        type=device_argument,
        metavar="DEVICE",
        help=f"compute device: {DEVICE_SPELLINGS} (default auto: a GPU when present, else the CPU)",
    )
    if threads:
        parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for inference and fitting")


def positive_int(text: str) -> int:
    """An argument that must be a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def prepare_device(args: argparse.Namespace) -> list[str]:
    """Check ``--device`` and apply ``--threads`` before any scan is read; the notices to show.

    A missing GPU fails here, before minutes of reading; ``auto`` falling back to the CPU gives
    a one-line notice, which the command shows after the scan was read (bad input must print
    nothing on stdout).
    """
    from KneeSegLogic.device import select_device

    notices: list[str] = []
    select_device(args.device, notice=notices.append)
    apply_threads(args)
    return notices


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU threads for inference and fitting (default: torch's own choice)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


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
