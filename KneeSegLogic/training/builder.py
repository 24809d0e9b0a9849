"""Turning trained members into a model package: ensemble weights chosen on held-out scans,
measured accuracy, and a model card that says what the model is, how good, and how to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.evaluation.metrics import evaluate
from KneeSegLogic.io.outputs import Progress
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.calibration import argmax_dice, decide_labels, fit_decision_offsets
from KneeSegLogic.segmentation.inference import (
    RunLog,
    fuse_on_grid,
    member_probabilities,
)
from KneeSegLogic.segmentation.package import ModelPackage, save_package
from KneeSegLogic.segmentation.postprocess import CONSISTENCY_STEPS, apply_postprocessing
from KneeSegLogic.tissues import TISSUES
from KneeSegLogic.training.anatomy import read_bank_record
from KneeSegLogic.training.data import load_anatomies, load_heldout_anatomies
from KneeSegLogic.training.heldout import HELDOUT_ACQUISITIONS, heldout_cases
from KneeSegLogic.training.losses import LOSSES
from KneeSegLogic.training.synthesis import Anatomy
from KneeSegLogic.training.trainer import DEFAULT_MEMBERS, MemberRecipe, hardware, train_member

PACKAGE_ID = "kneeseg-knee-2p5d"

PACKAGE_VERSION = "1.5.0"

# Bones: cut off thin leaks into neighbouring tissue, keep the largest piece and fill marrow holes;
# cartilage and menisci are thin and may be split by partial volume, so no component filtering
# there. The 2 mm opening was chosen on 10 calibration scans (seeds 80 000+) with the first default
# model: mean Dice femur +0.001, tibia +0.007 (one leak along the tibia 0.918 -> 0.960), fibula
# +0.003; the patella lost 0.002 (1.5 mm: no change), so it is not opened.
BONE_LABELS = [t.label for t in TISSUES if t.group == "bone"]

OPENED_BONES = [t.label for t in TISSUES if t.key in ("femur", "tibia", "fibula")]

POSTPROCESSING: list[dict[str, Any]] = [
    {"name": "opening", "radius_mm": 2.0, "labels": OPENED_BONES},
    {"name": "largest_component", "labels": BONE_LABELS, "components": 1},
    {"name": "fill_holes", "labels": BONE_LABELS},
    *CONSISTENCY_STEPS,
]


def weight_steps(members: int) -> int:
    """The blending-weight resolution: sixths up to three members (two members: 1/6 .. 5/6; three:
    ten splits, equal weights among them), else ``2 * members``-ths, so that the equal split is
    always a candidate and the number of candidates stays small (four members: 35 splits)."""
    return 6 if members <= 3 else 2 * members


def weight_candidates(members: int, steps: int | None = None) -> list[tuple[float, ...]]:
    """Every blending weight vector of ``members`` positive multiples of ``1 / steps`` summing to 1
    (``steps`` by default :func:`weight_steps`)."""
    steps = weight_steps(members) if steps is None else steps
    if members == 1:
        return [(1.0,)]
    return [
        (first / steps, *(w * (steps - first) / steps for w in rest))
        for first in range(1, steps - members + 2)
        for rest in weight_candidates(members - 1, steps - first)
    ]


CALIBRATION_SEED = 80_000  # held-out scans use heldout_cases' default seed (90 000)

# Scans per named acquisition: offsets fitted on one scan each followed that scan's noise (on the
# first model, offsets that gained 0.012 mean Dice on 5 calibration scans gained nothing held out).
CALIBRATION_REPEATS = 3

HELDOUT_REPEATS = 2

#: Decision offsets are kept only when they raise the held-out mean Dice by at least this much.
#: Fitted on few knees they follow those knees' soft-tissue thickness: on the anatomy bank the
#: offsets of 1.2.0's members raised the held-out mean by 0.001 (the composed knee's thin JAM
#: cartilage and menisci) and lowered the pymskt knee's plates and menisci by 0.02-0.06.
OFFSET_MIN_GAIN = 0.005

ENSEMBLE = "ensemble"

FINAL = "ensemble + decision offsets"


def _sessions(member_folder: Path) -> list[dict]:
    """The training runs a member's folder records (``sessions.json``: hardware, iterations, seconds);
    empty for members trained before runs were recorded."""
    path = member_folder / "sessions.json"
    return json.loads(path.read_text()) if path.exists() else []


def _notes(member_folder: Path) -> str:
    """Free-text notes a person left in a member's training folder (``notes.txt``), if any."""
    path = member_folder / "notes.txt"
    return path.read_text(encoding="utf-8").strip() if path.exists() else ""


def _spec(
    members: Sequence[MemberRecipe],
    weights: Sequence[float],
    training: dict,
    metrics: dict,
    decision_offsets: Sequence[float] | None = None,
) -> dict:
    return {
        "id": PACKAGE_ID,
        "version": PACKAGE_VERSION,
        "default": True,
        "description": f"Ensemble of {len(members)} 2.5D U-Nets ("
        + ", ".join(f"{m.plane} {m.pixel_mm:g} mm" for m in members)
        + ") segmenting knee bones, cartilage and menisci in MRI of any contrast, trained on synthetic images "
        "from real knee anatomy.",
        "license": "Apache-2.0",
        "labels": {str(t.label): t.key for t in TISSUES},
        "members": [
            {"name": m.name, "architecture": m.architecture(), "input": m.input_contract(), "weight": w}
            for m, w in zip(members, weights)
        ],
        "decision_offsets": list(decision_offsets) if decision_offsets is not None else [0.0] * (len(TISSUES) + 1),
        "postprocessing": POSTPROCESSING,
        "training": training,
        "metrics": metrics,
    }


def _case_scores(
    probabilities: np.ndarray, case_labels: Volume, channel_labels: np.ndarray, offsets: Sequence[float] | None
) -> dict[str, dict[str, float]]:
    """Dice and predicted/true volume ratio per structure after the decision and post-processing.

    Only structures the case's reference labels are scored: the clinical held-out knee is labelled
    for bones only, and cartilage predicted on it is neither right nor wrong (scoring it as Dice 0
    halved every held-out cartilage and meniscus mean before 2026-12-07)."""
    decided = channel_labels[decide_labels(probabilities, offsets)]
    labels = apply_postprocessing(case_labels.with_array(decided), POSTPROCESSING)
    result = evaluate(labels, case_labels)
    present = {name: m for name, m in result["structures"].items() if m["reference_volume_mm3"] > 0}
    return {
        "dice": {name: round(float(m["dice"]), 4) for name, m in present.items()},
        "volume_ratio": {
            name: round(float(m["prediction_volume_mm3"] / m["reference_volume_mm3"]), 3) for name, m in present.items()
        },
    }


def _member_maps(package: ModelPackage, cases: Sequence, flip_tta: bool = False) -> Iterator[list[np.ndarray]]:
    """Each member's probabilities on each case's own grid, one case at a time (members per case);
    ``flip_tta``: averaged with the prediction of the left-right mirrored scan."""
    for case in cases:
        per_member = [
            member_probabilities(package, i, case.image, torch.device("cpu"), RunLog(), flip_tta=flip_tta)
            for i in range(len(package.members))
        ]
        yield [fuse_on_grid([(m, 1.0)], case.image)[0] for m in per_member]


def _blend(member_maps: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the members' probability maps (weights normalised to sum 1)."""
    total = float(sum(weights))
    fused = np.multiply(member_maps[0], weights[0] / total, dtype=np.float32)
    for probabilities, weight in zip(member_maps[1:], weights[1:]):
        fused += np.float32(weight / total) * probabilities
    return fused


def _channels(labels: np.ndarray, channel_labels: np.ndarray) -> np.ndarray:
    """Tissue label values -> the package's output channel indices."""
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[channel_labels] = np.arange(len(channel_labels), dtype=np.uint8)
    return lookup[labels]


def calibrate(package: ModelPackage, anatomies, fit_offsets: bool = True) -> tuple[list[float], list[float], dict]:
    """Blending weights and decision offsets chosen on calibration scans (offsets all 0 without
    ``fit_offsets``).

    The calibration scans are synthesised like the held-out ones but with other seeds
    (:data:`CALIBRATION_SEED`), so the accuracy reported on the held-out scans is not the
    accuracy the choices were tuned on.
    """
    cases = heldout_cases(anatomies, seed=CALIBRATION_SEED, repeats=CALIBRATION_REPEATS)
    # Kept for every scan, as every weight candidate is scored on all of them: in float16, half the
    # memory (30 scans' maps take 13 GB in float32 for three members, 17 GB for four: too much for a
    # 24 GB machine beside the training knee). Its 1/2048 relative step is far below the probability
    # gaps a weight or offset change turns into a different decision.
    maps = [[m.astype(np.float16) for m in case_maps] for case_maps in _member_maps(package, cases)]
    channel_labels = np.asarray(package.tissue_labels, dtype=np.uint8)
    truths = [_channels(case.labels.array, channel_labels) for case in cases]
    candidates = weight_candidates(len(package.members))
    # The reported metric (mean over scans of the mean Dice over the structures each shows), one
    # blended scan at a time.
    blend_scores = {
        w: float(np.mean([np.nanmean(argmax_dice(_blend(m, w), t)) for m, t in zip(maps, truths)])) for w in candidates
    }
    weights = max(candidates, key=lambda w: blend_scores[w])
    if fit_offsets:
        offsets, before, after = fit_decision_offsets([(_blend(m, weights), t) for m, t in zip(maps, truths)])
    else:
        offsets, before, after = np.zeros(len(channel_labels)), blend_scores[weights], blend_scores[weights]
    summary = {
        "description": "Blending weights and decision offsets chosen on whole synthetic scans with seeds "
        f"unused in training and in the held-out evaluation ({CALIBRATION_REPEATS} per named "
        f"contrast/acquisition, seeds from {CALIBRATION_SEED}).",
        "mean_dice_by_weights": {"/".join(f"{x:.3g}" for x in w): round(v, 4) for w, v in blend_scores.items()},
        "mean_dice_before_offsets": round(before, 4),
        "mean_dice_after_offsets": round(after, 4),
    }
    if not fit_offsets:
        summary["offsets_dropped"] = "not fitted (kneeseg train --no-decision-offsets): the plain argmax"
    return list(weights), [float(v) for v in offsets], summary


def evaluate_heldout(
    package: ModelPackage,
    anatomies,
    weights: Sequence[float],
    offsets: Sequence[float],
    repeats: int = HELDOUT_REPEATS,
    flip_tta: bool = False,
) -> dict:
    """Dice and volume ratios per structure on every held-out scan (``repeats`` per acquisition and
    knee): members alone, the ensemble with plain argmax, and the ensemble with the decision
    offsets (what ``segment`` does); ``flip_tta`` as ``segment --flip-tta``."""
    cases = heldout_cases(anatomies, repeats=repeats)
    channel_labels = np.asarray(package.tissue_labels, dtype=np.uint8)
    per_case = {}
    for case, maps in zip(cases, _member_maps(package, cases, flip_tta)):
        variants: dict[str, tuple[np.ndarray, Sequence[float] | None]] = {
            member.name: (probabilities, None) for member, probabilities in zip(package.members, maps)
        }
        fused = _blend(maps, weights)
        variants[ENSEMBLE] = (fused, None)
        variants[FINAL] = (fused, offsets)
        per_case[case.name] = {
            name: _case_scores(p, case.labels, channel_labels, o) for name, (p, o) in variants.items()
        }
    return per_case


def _mean_dice(per_case: dict, variant: str) -> float:
    values = [np.mean(list(scores[variant]["dice"].values())) for scores in per_case.values()]
    return float(np.mean(values))


def _structure_means(per_case: dict, variant: str, key: str = "dice") -> dict[str, float]:
    """Per structure, the mean of ``key`` (Dice or volume ratio) over the cases that score it."""
    structures = sorted({s for scores in per_case.values() for s in scores[variant][key]})
    return {
        s: round(float(np.mean([c[variant][key][s] for c in per_case.values() if s in c[variant][key]])), 4)
        for s in structures
    }


@dataclass(frozen=True)
class TrainOptions:
    """How ``kneeseg train`` trains: minutes per member, CPU threads (0: torch's default), the
    loss (:data:`KneeSegLogic.training.losses.LOSSES`), the device, the work folder holding
    checkpoints (None: ``OUT.work``), to run members in parallel processes one member name, and a
    model package (id or path) whose members of the same name (or the one a recipe's ``start_from``
    names) and architecture start training, and the peak learning rate (None: each recipe's;
    fine-tuning wants a lower one). ``assemble_only`` trains nothing: the package is built from the
    best weights each member already has in the work folder (members trained separately, each for
    as long as it needed). ``members`` names the recipes the package is made of (default: all of
    :data:`~KneeSegLogic.training.trainer.DEFAULT_MEMBERS`). ``decision_offsets`` False ships the
    plain argmax. ``workers``: processes synthesising training boxes ahead of the network (0: in
    the training process; a GPU needs several)."""

    time_budget_min: float = 60.0
    threads: int = 0
    loss: str = "dice-ce"
    device: str = "auto"
    workdir: Path | None = None
    only_member: str | None = None
    overwrite: bool = False
    init_from: str | None = None
    learning_rate: float | None = None
    assemble_only: bool = False
    members: tuple[str, ...] = ()
    workers: int = 0
    decision_offsets: bool = True


def describe_data(paths: Sequence[Path], anatomies: Sequence[Anatomy]) -> dict:
    """What the model was trained on, for the card: each data path and how many knees it gave."""
    pairs = sum(a.image is not None for a in anatomies)
    described: dict = {
        "paths": [str(Path(p).resolve()) for p in paths],
        "label_maps": len(anatomies) - pairs,
        "image_label_pairs": pairs,
    }
    # An anatomy bank records where each knee came from and under which licence: the card cites it.
    banks = [record for record in (read_bank_record(Path(p)) for p in paths if Path(p).is_dir()) if record]
    if banks:
        described["sources"] = {key: source for bank in banks for key, source in bank["sources"].items()}
        described["knees"] = [
            {k: knee[k] for k in ("name", "role", "sources", "licences")} for bank in banks for knee in bank["knees"]
        ]
    return described


def _initial_networks(init_from: str | None, members: Sequence[MemberRecipe]) -> dict[str, torch.nn.Module]:
    """Starting networks from package ``init_from``, by recipe name: its member of the recipe's name,
    else the one the recipe's ``start_from`` names, when the architectures agree."""
    if init_from is None:
        return {}
    from KneeSegLogic.segmentation.registry import get_package

    package = get_package(init_from)
    shipped = {member.name: index for index, member in enumerate(package.members)}
    found = {}
    for spec in members:
        for name in (spec.name, spec.start_from):
            index = shipped.get(name) if name is not None else None
            if index is not None and spec.architecture() == {
                "name": package.members[index].architecture,
                "args": package.members[index].architecture_args,
            }:
                found[spec.name] = package.load_member(index)
                break
    if not found:
        raise KneeSegError(
            f"--init-from {init_from}: no member shares a name and architecture with {[m.name for m in members]}; "
            "nothing to start from"
        )
    return found


def train_package(
    data: Sequence[Path], out: Path, options: TrainOptions, progress: Progress | None = None
) -> ModelPackage | None:
    """Train every default member (resumable from the work folder), then build the package ``out``.

    With ``options.only_member`` only that member is trained and None is returned: several
    members can train in parallel processes sharing the work folder, and a later run without it
    finds them trained and assembles the package.
    """
    from KneeSegLogic.device import select_device

    progress = progress or Progress()
    if options.threads:
        torch.set_num_threads(options.threads)
    unknown = [name for name in options.members if name not in {m.name for m in DEFAULT_MEMBERS}]
    if unknown:
        raise KneeSegError(f"--members: unknown {', '.join(unknown)}; known: {[m.name for m in DEFAULT_MEMBERS]}")
    members = [
        m
        for m in DEFAULT_MEMBERS
        if options.only_member in (None, m.name) and (not options.members or m.name in options.members)
    ]
    if options.learning_rate is not None:
        members = [replace(m, learning_rate=options.learning_rate) for m in members]
    if not members:
        raise KneeSegError(f"unknown member {options.only_member!r}; known: {[m.name for m in DEFAULT_MEMBERS]}")
    if options.workers < 0:
        raise KneeSegError(f"--workers must be 0 or more, got {options.workers}")
    if options.loss not in LOSSES:
        raise KneeSegError(f"--loss {options.loss}: known losses are {', '.join(LOSSES)}")
    device = select_device(options.device)
    workdir = Path(options.workdir) if options.workdir else out.with_name(out.name + ".work")
    anatomies = load_anatomies(data)
    heldout = load_heldout_anatomies(data)
    sources = describe_data(data, anatomies)
    sources["heldout_knees"] = len(heldout)
    progress("data", 0.0, f"{sources['label_maps']} label maps, {sources['image_label_pairs']} image/label pairs")
    command = f"kneeseg train {' '.join(map(str, data))} -o {out} --workdir {workdir} "
    if options.members:
        command += f"--members {','.join(options.members)} "
    if not options.decision_offsets:
        command += "--no-decision-offsets "
    if options.assemble_only:
        weights = [workdir / spec.name / "best.safetensors" for spec in members]
        missing = [spec.name for spec, path in zip(members, weights) if not path.is_file()]
        if missing:
            raise KneeSegError(f"--assemble-only: no trained weights for {', '.join(missing)} in {workdir}")
        command += "--assemble-only"  # the command the card records trains nothing more either
    else:
        initial = _initial_networks(options.init_from, members)
        weights = [
            train_member(
                anatomies,
                spec,
                workdir,
                options.time_budget_min * 60,
                progress,
                loss=options.loss,
                device=str(device),
                heldout=heldout,
                initial=initial.get(spec.name),
                workers=options.workers,
            )
            for spec in members
        ]
        if options.only_member:
            progress("train", 1.0, f"member {options.only_member} trained; run again without --only-member to assemble")
            return None
        command += (
            f"--time-budget-min {options.time_budget_min} --loss {options.loss} --device {options.device} "
            + (f"--init-from {options.init_from} " if options.init_from else "")
            + (f"--learning-rate {options.learning_rate:g} " if options.learning_rate is not None else "")
            + "(members may be trained in parallel with --only-member NAME --threads 1)"
        )
    training = {"data": sources, "loss": options.loss, "hardware": hardware(device), "command": command}
    # With held-out knees, assembling reads only the first training knee (the card's comparison row):
    # the others' synthesis maps (about 8 GB for the 33-knee bank) are let go before the calibration
    # holds every member's probabilities of every scan (3 members: about 6 GB in float16, 13 GB in
    # float32); together they did not fit in 24 GB.
    kept = anatomies[:1] if heldout else anatomies
    del anatomies
    package = assemble_package(
        out,
        members,
        weights,
        workdir,
        kept,
        training,
        overwrite=options.overwrite,
        heldout=heldout,
        fit_offsets=options.decision_offsets,
    )
    progress("package", 1.0, f"model package written to {out}")
    return package


def assemble_package(
    out: Path,
    members: Sequence[MemberRecipe],
    weights_files: Sequence[Path],
    workdir: Path,
    anatomies: Sequence[Anatomy],
    run: dict,
    overwrite: bool = False,
    heldout: Sequence[Anatomy] = (),
    fit_offsets: bool = True,
) -> ModelPackage:
    """Choose blending weights on calibration scans, measure on held-out scans, write the package.

    ``fit_offsets`` False ships the plain argmax (no decision offsets fitted: offsets fitted on a
    few held-out knees can fit those knees' own tissue rather than knees in general).

    ``run`` says how the members were trained (data sources, loss, hardware, command) for the card.
    With ``heldout`` anatomies (whole knees never trained on, e.g. an anatomy bank's ``heldout/``)
    every choice (blending weight, decision offsets) is made on them and the card reports them next
    to the first training knee; decision offsets that do not raise the held-out mean Dice are
    dropped. Without, the scans are synthesised from the training knees (contrast generalisation
    only).
    """
    choice_anatomies = list(heldout) or list(anatomies)
    states = [load_file(str(path)) for path in weights_files]
    histories = [json.loads((Path(workdir) / m.name / "history.json").read_text()) for m in members]
    training = {
        **run,
        "method": "SynthSeg-style random contrasts from real anatomy (KneeSegLogic.training.synthesis)",
        "members": [
            {
                **asdict(m),
                "iterations": h[-1]["iteration"] if h else 0,
                "elapsed_s": h[-1]["elapsed_s"] if h else 0.0,
                "best_val_dice_mean": max((e["val_dice_mean"] for e in h), default=None),
                "notes": _notes(Path(workdir) / m.name),
                "sessions": _sessions(Path(workdir) / m.name),
            }
            for m, h in zip(members, histories)
        ],
        "torch": torch.__version__,
    }
    draft = save_package(
        Path(workdir) / "draft-package", _spec(members, [1.0] * len(members), training, {}), states, overwrite=True
    )
    weights, offsets, calibration = calibrate(draft, choice_anatomies, fit_offsets)
    per_case = evaluate_heldout(draft, choice_anatomies, weights, offsets)
    if heldout and fit_offsets and _mean_dice(per_case, FINAL) < _mean_dice(per_case, ENSEMBLE) + OFFSET_MIN_GAIN:
        offsets = [0.0] * len(offsets)
        calibration["offsets_dropped"] = (
            f"they raised the mean Dice on the held-out anatomies by less than {OFFSET_MIN_GAIN}"
        )
        for scores in per_case.values():  # what segment does now: the plain argmax
            scores[FINAL] = scores[ENSEMBLE]
    metrics = {
        "calibration_synthetic": calibration,
        "heldout_synthetic": {
            "description": "Dice and predicted/true volume per structure on whole synthetic scans with seeds and "
            f"deformations unused in training and calibration, {HELDOUT_REPEATS} per named "
            "contrast/acquisition.",
            "acquisitions": [a[0] for a in HELDOUT_ACQUISITIONS],
            "chosen_weights": weights,
            "mean_dice": {
                variant: round(_mean_dice(per_case, variant), 4) for variant in next(iter(per_case.values()))
            },
            "per_case": per_case,
        },
    }
    if heldout:
        metrics["heldout_synthetic"]["anatomies"] = "held-out knees (never in training)"
        training_knee = evaluate_heldout(draft, list(anatomies)[:1], weights, offsets)
        metrics["training_knee_synthetic"] = {
            "description": "The same acquisitions synthesised from the first training knee: the gap to the "
            "held-out knees measures shape over-fitting.",
            "mean_dice": {variant: round(_mean_dice(training_knee, variant), 4) for variant in (ENSEMBLE, FINAL)},
            "dice_per_structure": _structure_means(training_knee, FINAL),
            "volume_ratio_per_structure": _structure_means(training_knee, FINAL, "volume_ratio"),
        }
        metrics["heldout_synthetic"]["dice_per_structure"] = _structure_means(per_case, FINAL)
        metrics["heldout_synthetic"]["volume_ratio_per_structure"] = _structure_means(per_case, FINAL, "volume_ratio")
    spec = _spec(members, weights, training, metrics, offsets)
    card = model_card(spec)
    return save_package(out, spec, states, model_card=card, overwrite=overwrite)


def _described_data(data: dict | str) -> str:
    """The card's sentence on training data (older packages recorded it as one string)."""
    if isinstance(data, str):
        return data
    drawn = (
        " (an anatomy bank's knees drawn by composition: knees made from the same sources share one equal part "
        "of the training boxes)"
        if data.get("sources")
        else ""
    )
    return (
        f"{data['label_maps']} label map(s) and {data['image_label_pairs']} real image/label pair(s), "
        f"from {', '.join(data['paths'])}{drawn}"
    )


def model_card(spec: dict) -> str:
    """Markdown model card: data, augmentations, measured accuracy, licence, how to reproduce."""
    training, metrics = spec["training"], spec["metrics"]["heldout_synthetic"]
    lines = [
        f"# {spec['id']} {spec['version']}",
        "",
        spec["description"],
        "",
        "## Intended use",
        "Research segmentation of knee MRI (femur, tibia, patella, fibula, femoral / medial and lateral tibial / "
        "patellar cartilage, lateral and medial meniscus) as a starting point for review and manual correction "
        "in 3D Slicer. Not a medical device; every result needs a human check (see uncertainty.nrrd).",
        "",
        "## Training data",
        f"{_described_data(training['data'])}. Label maps are shown as images synthesised from their anatomy with random per-tissue intensities (MESE echoes, DESS, PD with and "
        "without fat saturation, T1, low-field GRE, fully random), pseudo-tissues in the background, a joint fluid film "
        "against cartilage and menisci, a dark cortex on the bones, bias field, gamma, "
        "Gaussian/Rician noise, blur, thick slices along random axes (2D sagittal/coronal/axial acquisitions), random "
        "rotation, scaling, elastic deformation, left/right mirroring and field-of-view crops; anatomy augmentation "
        "moves each bone with its cartilage and menisci by its own similarity transform and smooth deformation "
        "(patella size 0.75-1.4x, height and tilt, condyle width, tibial slope, joint space) and thins or thickens "
        "each cartilage plate and meniscus by one voxel on its free side.",
        "",
        "## Architecture",
    ]
    for member in spec["members"]:
        args = member["architecture"]["args"]
        lines.append(
            f"- {member['name']}: MONAI UNet 2D, {args['in_channels']} adjacent {member['input']['plane']} slices in, "
            "channels "
            f"{args['channels']}, input {member['input']['spacing_mm']} mm in-plane, slices "
            f"{member['input']['slice_spacing_mm']} mm, blending weight {member['weight']:g}"
        )
    calibration = spec["metrics"].get("calibration_synthetic")
    if calibration:
        offsets = spec["decision_offsets"]
        names = ["background"] + [spec["labels"][str(channel)] for channel in range(1, len(offsets))]
        shifted = ", ".join(f"{name} {value:+.1f}" for name, value in zip(names, offsets) if value)
        lines += [
            "",
            "## Calibration (synthetic scans, other seeds)",
            calibration["description"],
            f"Mean Dice by blending weights of the members: {calibration['mean_dice_by_weights']}; "
            f"decision offsets (log units, added before the argmax): {shifted or 'none'}"
            + (f" ({calibration['offsets_dropped']})" if calibration.get("offsets_dropped") else "")
            + f"; mean Dice {calibration['mean_dice_before_offsets']:.3f} -> "
            f"{calibration['mean_dice_after_offsets']:.3f}.",
        ]
    lines += [
        "",
        "## Measured accuracy (held-out synthetic scans)",
        metrics["description"],
        "",
        "| variant | mean Dice |",
        "|---|---|",
    ]
    lines += [f"| {variant} | {value:.3f} |" for variant, value in metrics["mean_dice"].items()]
    final = FINAL if FINAL in next(iter(metrics["per_case"].values())) else ENSEMBLE
    structures = sorted({s for case in metrics["per_case"].values() for s in case[final]["dice"]})
    for key, title in (("dice", "Dice"), ("volume_ratio", "Predicted / true volume")):
        lines += [
            "",
            f"{title} per structure ({final}):",
            "",
            "| acquisition | " + " | ".join(structures) + " |",
            "|---|" + "---|" * len(structures),
        ]
        for name, case in metrics["per_case"].items():
            lines.append(
                f"| {name} | " + " | ".join(f"{case[final][key].get(s, float('nan')):.2f}" for s in structures) + " |"
            )
    training_knee = spec["metrics"].get("training_knee_synthetic")
    if training_knee:
        lines += [
            "",
            "Held-out knees against the training knee (mean Dice, same acquisitions):",
            "",
            "| variant | held-out knees | training knee |",
            "|---|---|---|",
        ]
        lines += [
            f"| {variant} | {metrics['mean_dice'][variant]:.3f} | {value:.3f} |"
            for variant, value in training_knee["mean_dice"].items()
        ]
        if "dice_per_structure" in training_knee:
            lines += [
                "",
                "Per structure (mean over the acquisitions; structures a knee does not label are not scored there):",
                "",
                "| structure | Dice held-out | Dice training knee | volume ratio held-out | volume ratio training knee |",
                "|---|---|---|---|---|",
            ]
            for structure, value in training_knee["dice_per_structure"].items():
                held = metrics["dice_per_structure"].get(structure, float("nan"))
                ratio = metrics["volume_ratio_per_structure"].get(structure, float("nan"))
                own = training_knee["volume_ratio_per_structure"].get(structure, float("nan"))
                lines.append(f"| {structure} | {held:.3f} | {value:.3f} | {ratio:.2f} | {own:.2f} |")
    lines += [
        "",
        "Accuracy on real scans has not been measured against expert labels here (none were available); "
        "synthetic-to-real transfer is the main risk: check results visually and correct them.",
        "",
        "## Training run",
        f"- command: `{training['command']}`",
        f"- hardware: {training['hardware']}",
        f"- torch {training['torch']}",
    ]
    for member in training["members"]:
        lines.append(
            f"- {member['name']}: {member['iterations']} iterations in {member['elapsed_s'] / 60:.0f} min, "
            f"best validation Dice (synthetic) {member['best_val_dice_mean']}"
        )
        for run in member.get("sessions", []):
            precision = f", {run['mixed_precision']} mixed precision" if run.get("mixed_precision") else ""
            workers = f", {run['synthesis_workers']} synthesis workers" if run.get("synthesis_workers") else ""
            lines.append(
                f"  - trained on {run['hardware']}{precision}{workers}: iterations {run['first_iteration']}-"
                f"{run['first_iteration'] + run['iterations'] - 1} in {run['seconds'] / 60:.0f} min"
            )
        if member["notes"]:
            lines.append("  - note: " + " ".join(member["notes"].split()))
    sources = training["data"].get("sources") if isinstance(training["data"], dict) else None
    lines += ["", "## Licence", f"{spec['license']} (weights and code)."]
    if sources:
        lines += ["", "Anatomy sources (training and held-out knees):", ""]
        lines += [f"- {s['key']}: {s['description']}; {s['origin']}; {s['licence']}" for s in sources.values()]
    else:
        lines.append("Training anatomy: pymskt, MIT licence.")
    lines.append("")
    return "\n".join(lines)
