"""``kneeseg train DATA... -o PACKAGE``: train a model package (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from KneeSegLogic.commands import add_device, add_output

HELP = "train a model package from label maps (synthesis) or image/label pairs"
# The same keys as training.losses.LOSSES (not imported here: that loads torch).
LOSSES = ("dice-ce", "dice-wce", "dice-ce-boundary")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        type=Path,
        nargs="+",
        help="label map files or folders of label maps (images are synthesised from them), and/or "
        "folders of real pairs images/<case>.nrrd + labels/<case>.seg.nrrd",
    )
    add_output(parser)
    add_device(parser, threads=False)  # train has its own --threads (a TrainOptions field)
    parser.add_argument(
        "--workdir", type=Path, help="checkpoints and curves (default: OUT.work); training resumes from it"
    )
    parser.add_argument("--only-member", help="train only this ensemble member (run members in parallel processes)")
    parser.add_argument(
        "--members",
        type=lambda text: tuple(name for name in text.split(",") if name),
        default=(),
        metavar="NAME,NAME",
        help="the ensemble members the package is made of (default: all; see the model card for names)",
    )
    parser.add_argument("--time-budget-min", type=float, default=60.0, help="training time per member in minutes")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument(
        "--no-decision-offsets",
        dest="decision_offsets",
        action="store_false",
        help="ship the plain argmax: fit no decision offsets (offsets fitted on a few held-out knees can fit "
        "those knees' own tissue, e.g. thin menisci, rather than knees in general)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes synthesising training images ahead of the network (default 0: none, best on a few "
        "CPU cores; on a GPU use most cores: synthesis, not the GPU, limits the iterations per second)",
    )
    parser.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start each member from the same-named member of this model (id or package path): fine-tuning",
    )
    parser.add_argument(
        "--assemble-only",
        action="store_true",
        help="train nothing: build the package from the best weights every member has in the work folder",
    )
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: each member's recipe, 0.002)")
    parser.add_argument(
        "--loss",
        default="dice-ce",
        choices=LOSSES,
        help="dice-ce: soft Dice + cross-entropy (default); dice-wce: with Wang et al.'s dual-level "
        "weighted cross-entropy; dice-ce-boundary: plus Kervadec et al.'s boundary loss",
    )


def run(args: argparse.Namespace) -> int:
    from KneeSegLogic.training.builder import TrainOptions, train_package

    options = TrainOptions(
        time_budget_min=args.time_budget_min,
        threads=args.threads,
        loss=args.loss,
        device=args.device,
        workdir=args.workdir,
        only_member=args.only_member,
        overwrite=args.overwrite,
        init_from=args.init_from,
        learning_rate=args.learning_rate,
        assemble_only=args.assemble_only,
        members=args.members,
        workers=args.workers,
        decision_offsets=args.decision_offsets,
    )
    train_package(args.data, args.output, options)
    return 0
