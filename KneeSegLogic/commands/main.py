"""``kneeseg`` entry point: the command table, the parser, and one way of ending every command.

Exit codes: 0 success; 1 bad input or a failed run (one line on stderr naming the file and the
problem); 2 usage errors; 3 an unexpected internal error (the traceback is shown with
``--debug``); 130 cancelled.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import ModuleType
from typing import Callable, NamedTuple, Sequence

from KneeSegLogic import __version__
from KneeSegLogic.commands import (
    batch,
    evaluate,
    info,
    models,
    segment,
    surfaces,
    t2,
    train,
)
from KneeSegLogic.errors import CancelledError, KneeSegError


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _command(module: ModuleType) -> Command:
    return Command(module.HELP, module.add_arguments, module.run)


COMMANDS: dict[str, Command] = {
    "info": _command(info),
    "segment": _command(segment),
    "t2": _command(t2),
    "t2-change": Command(t2.CHANGE_HELP, t2.add_change_arguments, t2.run_change),
    "surfaces": _command(surfaces),
    "evaluate": _command(evaluate),
    "train": _command(train),
    "demo": Command(segment.DEMO_HELP, segment.add_demo_arguments, segment.run_demo),
    "batch": _command(batch),
    "models": _command(models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kneeseg",
        description="KneeSeg: knee MRI segmentation, uncertainty, quantitative T2 and surface models.",
    )
    parser.add_argument("--version", action="version", version=f"kneeseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def check_output_free(args: argparse.Namespace) -> None:
    """Refuse an existing output folder before any scan is read (``--overwrite`` allows it)."""
    output = getattr(args, "output", None)
    if output is not None and output.exists() and not getattr(args, "overwrite", False):
        raise KneeSegError(f"{output}: output folder exists; choose another or pass --overwrite")


def _terminate(signum: int, frame: object) -> None:
    raise CancelledError("terminated (SIGTERM)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Schedulers and process managers stop jobs with SIGTERM: turn it into a cancellation so the
    # partial output folder is removed like on any other error.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        check_output_free(args)
        return int(COMMANDS[args.command].run(args) or 0)
    except KneeSegError as error:
        print(f"kneeseg {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"kneeseg {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: say so in one line, traceback on --debug
        if args.debug:
            raise
        print(
            f"kneeseg {args.command}: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
