"""``kneeseg`` entry point: the command table, the parser, and one way of ending every command.

Exit codes: 0 success; 1 bad input or a failed run (one line on stderr naming the file and the
problem); 2 usage errors; 3 an unexpected internal error (the traceback is shown with
``--debug``); 130 cancelled.

Signals: SIGTERM (what schedulers and process managers send) is a cancellation like Ctrl-C: the
partial output folder is removed and the exit code is 130. Only the first signal interrupts the
run (a second one, while the first is being cleaned up, is ignored). Python runs signal handlers
only between bytecodes, so a run blocked inside a C library would never see them: a watchdog
thread woken by the signal removes this process's partial output folders and exits with 130 when
the run has not stopped :data:`SIGNAL_GRACE_S` seconds later.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple, Sequence

from KneeSegLogic import __version__
from KneeSegLogic.commands import (
    batch,
    evaluate,
    info,
    models,
    relax,
    segment,
    surfaces,
    t2,
    train,
)
from KneeSegLogic.errors import CancelledError, KneeSegError, one_line


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
    "relax": _command(relax),
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


def _input_paths(args: argparse.Namespace) -> list[Path]:
    """The paths a command reads: every path argument but its output folder."""
    paths: list[Path] = []
    for name, value in vars(args).items():
        if name in ("output", "batch_output"):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        paths += [v for v in values if isinstance(v, Path)]
    return paths


def check_output_free(args: argparse.Namespace) -> None:
    """Before any scan is read: refuse an existing output folder (``--overwrite`` allows it) and,
    always, an output folder that is, contains or lies inside an input."""
    output = getattr(args, "output", None)
    if output is not None:
        from KneeSegLogic.io.outputs import check_output_location

        check_output_location(output, _input_paths(args), getattr(args, "overwrite", False))


#: Seconds a run may take to stop after SIGTERM/SIGINT before the watchdog ends it.
SIGNAL_GRACE_S = 10.0

_signalled = threading.Event()


def _terminate(signum: int, frame: object) -> None:
    # Only the first SIGTERM or SIGINT interrupts: a second one must not break the clean-up of the
    # first (nor surface as a traceback from whatever finaliser it happens to land in).
    if not _signalled.is_set():
        _signalled.set()
        # The signal may land between ``open()`` and the ``with`` that would close the file; the
        # file is then closed as the stack unwinds, and its ResourceWarning (shown where warnings are
        # on, e.g. PYTHONWARNINGS=default) would be a second line after the one that says cancelled.
        warnings.filterwarnings("ignore", category=ResourceWarning)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise CancelledError("terminated (SIGTERM)")


def _watchdog(wakeup: int, command: str) -> None:
    while True:
        try:
            received = os.read(wakeup, 64)
        except OSError:
            return
        if not received or not ({signal.SIGTERM, signal.SIGINT} & set(received)):
            continue
        time.sleep(SIGNAL_GRACE_S)
        from KneeSegLogic.io.outputs import remove_partials

        remove_partials()
        sys.stderr.write(f"kneeseg {command}: cancelled ({SIGNAL_GRACE_S:g} s after the signal, still busy)\n")
        sys.stderr.flush()
        os._exit(130)


_watchdog_started = False


def _install_signal_handlers(command: str) -> None:
    """SIGTERM as cancellation, and the watchdog for runs blocked in C code (once per process)."""
    global _watchdog_started
    _signalled.clear()
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _terminate)
    if _watchdog_started or threading.current_thread() is not threading.main_thread():
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread of the main interpreter
        os.close(read_end)
        os.close(write_end)
        return
    threading.Thread(target=_watchdog, args=(read_end, command), daemon=True, name="kneeseg-signal-watchdog").start()
    _watchdog_started = True


def _finished_anyway(args: argparse.Namespace) -> bool:
    """Whether the command's output folder was published before the cancellation arrived."""
    output = getattr(args, "output", None)
    if output is None:
        return False
    from KneeSegLogic.io.outputs import PUBLISHED

    return Path(output).resolve() in PUBLISHED


def _cancelled(args: argparse.Namespace, error: BaseException) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up is done: do not interrupt the exit
    if _finished_anyway(args):
        print(f"kneeseg {args.command}: interrupted after {args.output} was complete; it is kept", file=sys.stderr)
        return 0
    print(f"kneeseg {args.command}: {error or 'cancelled'}", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Schedulers and process managers stop jobs with SIGTERM: turn it into a cancellation so the
    # partial output folder is removed like on any other error.
    interrupt_handler = signal.getsignal(signal.SIGINT)
    _install_signal_handlers(args.command)
    try:
        check_output_free(args)
        return int(COMMANDS[args.command].run(args) or 0)
    except CancelledError as error:
        return _cancelled(args, error)
    except KneeSegError as error:
        print(f"kneeseg {args.command}: error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as error:
        return _cancelled(args, CancelledError("cancelled") if not str(error) else error)
    except Exception as error:  # a bug, not bad input: say so in one line, traceback on --debug
        if args.debug:
            traceback.print_exc()
            return 3
        print(
            f"kneeseg {args.command}: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, interrupt_handler)  # callers in-process keep their own Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
