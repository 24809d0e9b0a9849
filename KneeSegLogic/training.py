"""Training 2.5D members on synthetic images from real label maps (or real image/label pairs).

One *member* is a 2D network that sees ``2k+1`` adjacent sagittal slices as channels at a given
working spacing (KneeXNet-2.5D); an ensemble is several members at different in-plane
resolutions (scale space) and noise settings (noise space), fused by mean softmax.

Training is time-budgeted and resumable: ``workdir/<member>/checkpoint.pt`` holds the network,
optimiser, iteration and elapsed time; ``best.safetensors`` the weights with the best validation
Dice (checkpointing on validation Dice); ``history.json`` the curves. Seeds make runs repeatable
up to thread scheduling.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from .contrast_synthesis import Anatomy, Synthesizer, SynthesisSettings
from .errors import InputError
from .losses import MixedLoss
from .networks import build_network
from .segfile import read_labels
from .tissues import TISSUES
from .volume import IMAGE_SUFFIXES, read_volume

NUM_CLASSES = 1 + max(t.label for t in TISSUES)


@dataclass
class MemberSpec:
    """How one 2.5D member is trained and what its input contract is."""

    name: str
    pixel_mm: float
    slice_mm: float = 1.5
    context_slices: int = 2
    crop: int = 160
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    noise_range: tuple[float, float] = (0.005, 0.08)
    slices_per_box: int = 12
    boxes_per_batch: int = 1
    learning_rate: float = 2e-3
    seed: int = 0

    def architecture(self) -> dict:
        return {
            "name": "monai.UNet",
            "args": {
                "spatial_dims": 2,
                "in_channels": 2 * self.context_slices + 1,
                "out_channels": NUM_CLASSES,
                "channels": list(self.channels),
                "strides": list(self.strides),
                "num_res_units": self.num_res_units,
            },
        }

    def input_contract(self) -> dict:
        return {
            "kind": "2.5d",
            "plane": "sagittal",
            "context_slices": self.context_slices,
            "spacing_mm": [self.pixel_mm, self.pixel_mm],
            "slice_spacing_mm": self.slice_mm,
            "normalisation": {"name": "percentile", "low": 1, "high": 99},
        }


@dataclass
class TrainingState:
    iteration: int = 0
    elapsed_s: float = 0.0
    best_dice: float = -1.0
    history: list[dict] = field(default_factory=list)


def _synthesizer(anatomies: list[Anatomy], spec: MemberSpec, seed: int) -> Synthesizer:
    depth = 2 * spec.context_slices + spec.slices_per_box
    settings = SynthesisSettings(noise_range=spec.noise_range)
    return Synthesizer(anatomies, (depth, spec.crop, spec.crop), (spec.slice_mm, spec.pixel_mm, spec.pixel_mm), settings, seed)


def stacks_from_box(image: torch.Tensor, labels: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2.5D inputs of a box: (N, 2k+1, H, W) slice stacks and (N, H, W) centre labels."""
    depth = image.shape[0]
    centres = range(context, depth - context)
    inputs = torch.stack([image[c - context : c + context + 1] for c in centres])
    targets = torch.stack([labels[c] for c in centres])
    return inputs, targets


def dice_per_class(prediction: torch.Tensor, target: torch.Tensor, classes: int) -> np.ndarray:
    """Hard Dice per foreground class over a batch (NaN where a class is absent from both)."""
    scores = np.full(classes - 1, np.nan)
    for c in range(1, classes):
        p, t = prediction == c, target == c
        total = int(p.sum() + t.sum())
        if total:
            scores[c - 1] = 2 * int((p & t).sum()) / total
    return scores


def _validation_set(anatomies: list[Anatomy], spec: MemberSpec, boxes: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    synthesizer = _synthesizer(anatomies, spec, seed=10_000 + spec.seed)
    return [stacks_from_box(*synthesizer.sample(), spec.context_slices) for _ in range(boxes)]


@torch.no_grad()
def validate(network: torch.nn.Module, validation: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    network.eval()
    predictions, targets = [], []
    for inputs, target in validation:
        predictions.append(network(inputs).argmax(1))
        targets.append(target)
    network.train()
    return dice_per_class(torch.cat(predictions), torch.cat(targets), NUM_CLASSES)


def train_member(
    anatomies: list[Anatomy],
    spec: MemberSpec,
    workdir: Path,
    time_budget_s: float,
    progress: Callable[[str, float, str], None] | None = None,
    validate_every: int = 150,
) -> Path:
    """Train (or resume) one member for ``time_budget_s`` seconds in total; return best weights."""
    folder = Path(workdir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    network = build_network(**spec.architecture())
    optimiser = torch.optim.Adam(network.parameters(), lr=spec.learning_rate)
    state = TrainingState()
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        network.load_state_dict(saved["network"])
        optimiser.load_state_dict(saved["optimiser"])
        state = TrainingState(**json.loads(saved["state"]))
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    synthesizer = _synthesizer(anatomies, spec, seed=spec.seed + state.iteration)
    validation = _validation_set(anatomies, spec)
    loss_function = MixedLoss(tau_dice=1.0, tau_ce=1.0)
    best = folder / "best.safetensors"
    started = time.perf_counter() - state.elapsed_s
    running = []

    def save() -> None:
        state.elapsed_s = time.perf_counter() - started
        payload = {"network": network.state_dict(), "optimiser": optimiser.state_dict(),
                   "state": json.dumps(asdict(state))}
        torch.save(payload, folder / "checkpoint.tmp")
        (folder / "checkpoint.tmp").replace(checkpoint)
        (folder / "history.json").write_text(json.dumps(state.history, indent=1))

    while (elapsed := time.perf_counter() - started) < time_budget_s:
        fraction = elapsed / time_budget_s
        for group in optimiser.param_groups:  # cosine decay over the time budget
            group["lr"] = spec.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * fraction)))
        boxes = [stacks_from_box(*synthesizer.sample(), spec.context_slices) for _ in range(spec.boxes_per_batch)]
        inputs = torch.cat([b[0] for b in boxes])
        targets = torch.cat([b[1] for b in boxes])
        loss = loss_function(network(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        state.iteration += 1
        running.append(loss.item())
        if state.iteration % validate_every == 0:
            dice = validate(network, validation)
            mean_dice = float(np.nanmean(dice))
            state.history.append({"iteration": state.iteration, "elapsed_s": round(elapsed, 1),
                                  "loss": round(float(np.mean(running)), 4), "val_dice_mean": round(mean_dice, 4),
                                  "val_dice": [None if np.isnan(d) else round(float(d), 4) for d in dice]})
            running = []
            if mean_dice > state.best_dice:
                state.best_dice = mean_dice
                save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(best))
            save()
            if progress is not None:
                progress("train", fraction, f"{spec.name}: iteration {state.iteration}, val Dice {mean_dice:.3f}")
    if not best.exists():
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(best))
    save()
    return best


#: The default ensemble (KneeXNet-2.5D's scale space): a fine and a coarse in-plane resolution,
#: with different noise ranges (noise space).
DEFAULT_MEMBERS: tuple[MemberSpec, ...] = (
    MemberSpec("sagittal-0.75mm", pixel_mm=0.75, crop=160, noise_range=(0.005, 0.06), seed=1),
    MemberSpec("sagittal-1.15mm", pixel_mm=1.15, crop=128, noise_range=(0.02, 0.10), seed=2),
)


def _case_name(path: Path) -> str:
    """A case's name: the file name without its image or segmentation suffix (``a.seg.nrrd`` -> ``a``)."""
    name = path.name
    if path.is_dir():  # a DICOM series
        return name
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cases(folder: Path, allow_folders: bool) -> dict[str, Path]:
    """Case name -> file (or DICOM folder) in ``folder``; hidden entries (partial writes) skipped."""
    cases: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        readable = entry.name.lower().endswith(IMAGE_SUFFIXES) if entry.is_file() else allow_folders
        if entry.name.startswith(".") or not readable:
            continue
        name = _case_name(entry)
        if name in cases:
            raise InputError(entry, f"case {name!r} has two files in {folder.name}/ ({cases[name].name} and {entry.name})")
        cases[name] = entry
    return cases


def find_training_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, labels) of the pairs layout: ``folder/images/<case>.*`` with ``folder/labels/<case>.*``.

    That is what the Slicer module's "save corrected case" writes (``images/<case>.nrrd``,
    ``labels/<case>.seg.nrrd``). Images are NRRD/NIfTI/MHA files or DICOM folders; labels are
    Slicer segmentations or label volumes with KneeSeg label values. Returns ``[]`` when
    ``folder`` has no ``images/`` and ``labels/`` subfolders.

    Raises
    ------
    InputError
        A case with an image but no labels or the reverse, or two files for one case.
    """
    images_folder, labels_folder = Path(folder) / "images", Path(folder) / "labels"
    if not (images_folder.is_dir() and labels_folder.is_dir()):
        return []
    images, labels = _cases(images_folder, allow_folders=True), _cases(labels_folder, allow_folders=False)
    for name in sorted(set(images) ^ set(labels)):
        path, other = (images[name], "labels") if name in images else (labels[name], "images")
        raise InputError(path, f"case {name!r} has no file of the same name in {other}/")
    return [(images[name], labels[name]) for name in sorted(images)]


def read_training_pair(image_path: Path, label_path: Path) -> Anatomy:
    """An anatomy carrying its real image, from a scan and its label file.

    The image is the scan itself, or its second echo if multi-echo (the echo inference reads);
    labels on another grid are resampled onto the scan's grid by nearest neighbour.
    """
    from .pipeline import segmentation_image  # the echo choice of inference (heavy module: lazily)

    image = segmentation_image(read_volume(image_path), None)
    return Anatomy.from_pair(image, read_labels(label_path, reference=image))


def load_anatomies(paths: Path | Sequence[Path]) -> list[Anatomy]:
    """Training anatomies from label maps (images synthesised) and real (image, label) pairs.

    Each path is a label map file, or a folder holding label maps (NRRD/NIfTI/MHA label volumes
    or Slicer segmentations, KneeSeg label values) and/or the pairs layout of
    :func:`find_training_pairs` (``images/`` and ``labels/`` subfolders); both may be mixed.
    Pairs give anatomies with an ``image``, which synthesis shows with its real intensities
    (:attr:`SynthesisSettings.real_image_probability`).
    """
    anatomies = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_file():
            label_maps, pairs = [path], []
        else:
            label_maps = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                                and p.name.lower().endswith(IMAGE_SUFFIXES))
            pairs = find_training_pairs(path)
        if not label_maps and not pairs:
            raise InputError(path, "no label maps (NRRD, NIfTI, MHA) and no images/ + labels/ pairs found")
        anatomies += [Anatomy.from_volume(read_labels(file)) for file in label_maps]
        anatomies += [read_training_pair(image, labels) for image, labels in pairs]
    return anatomies


def run_train(args) -> int:
    """``kneeseg train DATA -o PACKAGE``: train every member (resumable), then write the package.

    With ``--only-member NAME`` only that member is trained (several can run in parallel
    processes sharing ``--workdir``); a later run without it finds them trained and assembles.
    """
    from .outputs import Progress

    progress = Progress()
    torch.set_num_threads(args.threads) if args.threads else None
    members = [m for m in DEFAULT_MEMBERS if args.only_member in (None, m.name)]
    if not members:
        from .errors import KneeSegError

        raise KneeSegError(f"unknown member {args.only_member!r}; known: {[m.name for m in DEFAULT_MEMBERS]}")
    workdir = Path(args.workdir) if args.workdir else args.output.with_name(args.output.name + ".work")
    anatomies = load_anatomies(args.data)
    pairs = sum(a.image is not None for a in anatomies)
    progress("data", 0.0, f"{len(anatomies) - pairs} label maps, {pairs} image/label pairs")
    budget = args.time_budget_min * 60
    weights = [train_member(anatomies, spec, workdir, budget, progress) for spec in members]
    if args.only_member:
        progress("train", 1.0, f"member {args.only_member} trained; run again without --only-member to assemble")
        return 0
    from .model_card import assemble_package

    assemble_package(args, DEFAULT_MEMBERS, weights, workdir)
    progress("package", 1.0, f"model package written to {args.output}")
    return 0
