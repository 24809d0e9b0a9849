"""``kneeseg batch CASES -o OUT``: ``segment`` over many cases, resumable, on Dask when installed."""

from __future__ import annotations

import argparse
from pathlib import Path

from KneeSegLogic.commands import add_device, apply_threads

HELP = "run `segment` over many cases, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "cases",
        type=Path,
        help="folder of scans (files and DICOM sub-folders) or CSV with columns case_id,path[,echo_times]",
    )
    # Not dest "output": the batch folder is resumable, so an existing one is not refused (each
    # case folder inside it is still written atomically and never overwritten without --overwrite).
    parser.add_argument(
        "-o",
        "--output",
        dest="batch_output",
        required=True,
        type=Path,
        help="batch folder: OUT/<case_id>/ per case, OUT/summary.csv, OUT/batch.json; rerun to resume",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo cases already done (default: skip them)")
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786 (default: a local cluster)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the local Dask cluster (default 1)")
    parser.add_argument("--model", help="model package id or path (default: the bundled default model)")
    add_device(parser)
    parser.add_argument("--no-surfaces", action="store_true", help="skip surface models")


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.pipeline.batch import BatchOptions, run_batch

    apply_threads(args)

    options = BatchOptions(
        model=args.model,
        device=args.device,
        surfaces=not args.no_surfaces,
        overwrite=args.overwrite,
        scheduler=args.scheduler,
        workers=args.workers,
    )
    run_batch(args.cases, args.batch_output, options)
    return 0
