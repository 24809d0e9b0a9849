"""``kneeseg`` command line: one sub-command per job, all sharing input validation.

Exit codes: 0 success; 1 bad input or a failed run (one line on stderr naming the file and the
problem); 2 usage errors and commands not available yet; 3 an unexpected internal error (the
traceback is shown with ``--debug``); 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import CancelledError, KneeSegError, NotAvailableError


def parse_echo_times(text: str) -> list[float]:
    """``"10,20,30"`` -> ``[10.0, 20.0, 30.0]`` (milliseconds)."""
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"echo times must be comma-separated numbers in ms, got {text!r}") from None


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (written as OUT.partial, renamed when complete)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (auto: CUDA when present)")


# Each command: (help, function adding its arguments, "module:function" handling it). A handler
# whose module does not exist yet makes the command report that it is not available (exit 2).
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="scan: NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--echo-times", type=parse_echo_times, help="echo times in ms for a 4D file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="scan: NIfTI/NRRD/MHA file or DICOM folder (multi-echo accepted)")
    _add_output(p)
    p.add_argument("--echo-times", type=parse_echo_times, help="echo times in ms for a 4D file")
    p.add_argument("--model", help="model package id (default: the bundled default model)")
    _add_device(p)
    p.add_argument("--no-surfaces", action="store_true", help="skip surface models")
    p.add_argument("--closing-radius", type=float, default=None, help="closing radius in mm (default: from the model package)")
    p.add_argument("--members", type=int, default=0, help="use the first N ensemble members (0: all)")
    p.add_argument("--flip-tta", action="store_true", help="also predict the left-right mirrored scan and average (2x time)")
    p.add_argument("--regions", choices=["dosma", "thomas"], default=None, help="femoral subregion recipe for multi-echo T2 (default: dosma)")


def _t2_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="multi-echo DICOM folder, or 4D NIfTI/NRRD with --echo-times")
    _add_output(p)
    p.add_argument("--echo-times", type=parse_echo_times, help="echo times in ms (comma-separated) for a 4D file")
    p.add_argument("--mask", type=Path, help="segmentation (.seg.nrrd or label volume) limiting the fit and giving regions")
    p.add_argument("--model", default="ncexp", choices=["loglinear", "mono", "mono-offset", "ncexp"], help="signal model (default: noise-corrected mono-exponential)")
    p.add_argument("--keep-first-echo", action="store_true", help="fit echo 1 too (skipped by default: stimulated echoes make it wrong in spin-echo trains)")
    p.add_argument("--sigma", type=float, help="noise SD per receiver channel for ncexp, in signal units (default: from the image background)")
    p.add_argument("--channels", type=int, default=1, help="receiver channels of the magnitude combination, for ncexp (default 1: Rician)")
    p.add_argument("--min-r2", type=float, help="reject voxels whose fit R^2 is lower (DOSMA uses 0.9)")
    p.add_argument("--regions", choices=["dosma", "thomas"], help="femoral subregion recipe (default: dosma)")
    _add_device(p)


def _t2_change_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", type=Path, help="output folder of `kneeseg t2`/`segment` at baseline")
    p.add_argument("followup", type=Path, help="output folder at follow-up")
    _add_output(p)


def _surfaces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("segmentation", type=Path, help=".seg.nrrd or label volume")
    _add_output(p)
    # The same names as surfaces.SMOOTHING_METHODS (not imported here: it would load VTK for every command).
    p.add_argument("--smoothing", default="windowed-sinc", choices=["windowed-sinc", "laplacian-idw", "none"],
                   help="surface smoothing (default: volume-preserving windowed sinc)")
    p.add_argument("--decimate", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of triangles to remove by quadric decimation, 0 to <1 (default 0)")
    p.add_argument("--structures", help="comma-separated structure keys or label values (default: all present)")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prediction", type=Path, help="predicted segmentation (.seg.nrrd or label volume)")
    p.add_argument("reference", type=Path, help="reference segmentation")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, nargs="+",
                   help="label map files or folders of label maps (images are synthesised from them), and/or "
                        "folders of real pairs images/<case>.nrrd + labels/<case>.seg.nrrd")
    _add_output(p)
    _add_device(p)
    p.add_argument("--workdir", type=Path, help="checkpoints and curves (default: OUT.work); training resumes from it")
    p.add_argument("--only-member", help="train only this ensemble member (run members in parallel processes)")
    p.add_argument("--time-budget-min", type=float, default=60.0, help="training time per member in minutes")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    _add_output(p)
    _add_device(p)


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cases", type=Path, help="folder of scans (files and DICOM sub-folders) or CSV with columns case_id,path[,echo_times]")
    # Not dest "output": the batch folder is resumable, so an existing one is not refused (each
    # case folder inside it is still written atomically and never overwritten without --overwrite).
    p.add_argument("-o", "--output", dest="batch_output", required=True, type=Path,
                   help="batch folder: OUT/<case_id>/ per case, OUT/summary.csv, OUT/batch.json; rerun to resume")
    p.add_argument("--overwrite", action="store_true", help="redo cases already done (default: skip them)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786 (default: a local cluster)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of the local Dask cluster (default 1)")
    p.add_argument("--model", help="model package id or path (default: the bundled default model)")
    _add_device(p)
    p.add_argument("--no-surfaces", action="store_true", help="skip surface models")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--import", dest="import_path", type=Path, metavar="PACKAGE", help="copy a package folder or .zip into the user cache (offline sites)")
    p.add_argument("--download", metavar="URL", help="download a package .zip into the user cache (needs --sha256)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the --download zip")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "info": ("describe a scan: size, spacing, origin, direction, echo times", _info_args, "KneeSegLogic.cli:run_info"),
    "segment": ("segment bones, cartilage and menisci; uncertainty, surfaces, report", _segment_args, "KneeSegLogic.pipeline:run_segment"),
    "t2": ("fit a T2 map from a multi-echo scan; cartilage region statistics", _t2_args, "KneeSegLogic.t2_command:run_t2"),
    "t2-change": ("T2 change between two time points, focal lesion clusters", _t2_change_args, "KneeSegLogic.longitudinal:run_t2_change"),
    "surfaces": ("smoothed surface models (STL/VTP, mm) from a segmentation", _surfaces_args, "KneeSegLogic.surfaces:run_surfaces"),
    "evaluate": ("compare a segmentation with a reference: Dice, IoU, HD95, ASSD", _evaluate_args, "KneeSegLogic.metrics:run_evaluate"),
    "train": ("train a model package from label maps (synthesis) or image/label pairs", _train_args, "KneeSegLogic.training:run_train"),
    "demo": ("run the main job on the bundled sample", _demo_args, "KneeSegLogic.pipeline:run_demo"),
    "batch": ("run `segment` over many cases, resumable", _batch_args, "KneeSegLogic.batch:run_batch"),
    "models": ("list the model packages found", _models_args, "KneeSegLogic.models:run_models"),
}

# Arguments that name scans: validated before the handler runs, for every command.
SCAN_ARGUMENTS = ("path", "input")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kneeseg",
        description="KneeSeg: knee MRI segmentation, uncertainty, quantitative T2 and surface models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int | None]:
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        module = None
    handler = getattr(module, function_name, None)
    if handler is None:
        raise NotAvailableError("this command is not available yet in this version of KneeSeg")
    return handler


def validate_inputs(args: argparse.Namespace) -> None:
    """Read and check every scan argument, so bad input fails the same way in every command."""
    from .volume import read_volume

    for name in SCAN_ARGUMENTS:
        path = getattr(args, name, None)
        if path is not None:
            read_volume(path, getattr(args, "echo_times", None))
    output = getattr(args, "output", None)
    if output is not None and output.exists() and not getattr(args, "overwrite", False):
        raise KneeSegError(f"{output}: output folder exists; choose another or pass --overwrite")


def run_info(args: argparse.Namespace) -> int:
    from .volume import read_volume

    volume = read_volume(args.path, args.echo_times)
    info = {
        "size": list(volume.size),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": [float(v) for v in volume.direction.ravel()],
        "echo_times_ms": None if volume.echo_times_ms is None else list(volume.echo_times_ms),
        "dtype": str(volume.array.dtype),
    }
    if args.json:
        print(json.dumps(info))
    else:
        from .volume import orientation_code

        print(f"{args.path}")
        print(f"  size (i, j, k)   {info['size']}")
        print(f"  spacing (mm)     {[round(s, 6) for s in info['spacing']]}")
        print(f"  origin (LPS mm)  {[round(o, 4) for o in info['origin']]}")
        print(f"  orientation      {orientation_code(volume)}")
        print(f"  echo times (ms)  {info['echo_times_ms']}")
        print(f"  voxel type       {info['dtype']}")
    return 0


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
        handler = COMMANDS[args.command][2]
        if handler != "KneeSegLogic.cli:run_info":
            validate_inputs(args)
        return int(_resolve(handler)(args) or 0)
    except KneeSegError as error:
        print(f"kneeseg {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"kneeseg {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: say so in one line, traceback on --debug
        if args.debug:
            raise
        print(f"kneeseg {args.command}: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
