"""Training 2.5D members on synthetic images from real label maps (or real image/label pairs).

One *member* is a 2D network that sees ``2k+1`` adjacent slices of one plane (sagittal, coronal or
axial) as channels at a given working spacing (KneeXNet-2.5D); an ensemble is several members at
different in-plane resolutions (scale space), noise settings (noise space) and planes (Luan et
al.'s multi-planar fusion F = aC + bA + cS), fused by weighted mean softmax.

Training is time-budgeted and resumable: ``workdir/<member>/checkpoint.pt`` holds the network,
optimiser, iteration and elapsed time; ``best.safetensors`` the weights with the best validation
Dice (checkpointing on validation Dice); ``history.json`` the curves. Validation boxes come from
held-out anatomies (whole knees never trained on, e.g. an anatomy bank's ``heldout/``) when there
are any, so the checkpoint kept is the one that generalises to new knees; otherwise from the
training anatomies. Seeds make runs repeatable up to thread scheduling (with ``workers`` the
boxes' order also depends on which worker finishes first).

Each run of :func:`train_member` is recorded in ``workdir/<member>/sessions.json`` (hardware,
iterations, seconds, synthesis workers, mixed precision), so a model card can say where every
member was trained when its training was spread over CPU runs and a GPU run.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from KneeSegLogic.io.outputs import atomic_file, write_json
from KneeSegLogic.segmentation.inference import PLANE_AXIS
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.tissues import TISSUES
from KneeSegLogic.training.losses import make_loss
from KneeSegLogic.training.synthesis import Anatomy, AnatomySettings, SynthesisSettings, Synthesizer

NUM_CLASSES = 1 + max(t.label for t in TISSUES)


@dataclass
class MemberRecipe:
    """How one 2.5D member is trained and what its input contract is.

    ``plane`` is the plane of its slices (the slice axis is the canonical array axis
    :data:`~KneeSegLogic.segmentation.inference.PLANE_AXIS` names, as in inference). ``start_from``
    names the member of a ``--init-from`` package whose weights start this one when that package
    has no member of this recipe's own name (e.g. a coronal member started from a sagittal one:
    the networks are fully convolutional, so features transfer across planes and scales).
    """

    name: str
    pixel_mm: float
    plane: str = "sagittal"
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
    start_from: str | None = None

    @property
    def slice_axis(self) -> int:
        """Canonical (k, j, i) = (R, I, P) array axis across this member's slices."""
        return PLANE_AXIS[self.plane]

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
            "plane": self.plane,
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
    validation: str = "training"  # the anatomies best_dice was measured on: "training" or "heldout"
    sessions: list[dict] = field(default_factory=list)  # one entry per run: where, how long, how many


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware(device: torch.device) -> str:
    """Where training runs, in words: the CPU, torch's CPU threads and the device (a GPU's name)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return f"{_cpu_name()}, {torch.get_num_threads()} CPU threads, device {device} ({where})"


def _synthesizer(
    anatomies: Sequence[Anatomy], spec: MemberRecipe, seed: int, settings: SynthesisSettings | None = None
) -> Synthesizer:
    """Boxes of the canonical (R, I, P) frame: ``crop`` voxels of ``pixel_mm`` in-plane and the
    slices plus their context across the member's plane."""
    shape, spacing = [spec.crop] * 3, [spec.pixel_mm] * 3
    shape[spec.slice_axis] = 2 * spec.context_slices + spec.slices_per_box
    spacing[spec.slice_axis] = spec.slice_mm
    settings = settings or SynthesisSettings(noise_range=spec.noise_range)
    box = (shape[0], shape[1], shape[2])
    return Synthesizer(list(anatomies), box, (spacing[0], spacing[1], spacing[2]), settings, seed)


class _BoxStream(torch.utils.data.IterableDataset):
    """Endless 2.5D training stacks (:func:`stacks_from_box`), one synthesizer per loader worker.

    Worker ``w`` draws with seed ``seed + 1_000_003 * (w + 1)`` and the training process itself
    (no workers) with ``seed``: the workers' streams differ, and a resumed run (whose ``seed``
    includes the iteration reached) does not repeat an earlier one.
    """

    def __init__(self, anatomies: Sequence[Anatomy], spec: MemberRecipe, seed: int) -> None:
        self.anatomies, self.spec, self.seed = list(anatomies), spec, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        synthesizer = _synthesizer(self.anatomies, self.spec, seed=self.seed + 1_000_003 * (worker + 1))
        while True:
            yield stacks_from_box(*synthesizer.sample(), self.spec.context_slices, self.spec.slice_axis)


def training_batches(
    anatomies: Sequence[Anatomy], spec: MemberRecipe, seed: int, workers: int = 0
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Endless ``(inputs, targets)`` batches of ``spec.boxes_per_batch`` synthetic boxes.

    ``workers`` 0 synthesises each box in this process when it is needed (seeded: the same boxes
    every run). With ``workers`` > 0 that many processes synthesise ahead while the network trains
    (torch's DataLoader, one CPU thread each): on a GPU synthesis is what limits the iterations per
    second (about 0.1-0.25 s per box on one core, against milliseconds per training step).
    """
    stream = _BoxStream(anatomies, spec, seed)
    boxes = iter(stream)  # synthesised here, box by box
    if workers > 0:
        boxes = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4))
    while True:
        batch = [next(boxes) for _ in range(spec.boxes_per_batch)]
        yield torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])


def stacks_from_box(
    image: torch.Tensor, labels: torch.Tensor, context: int, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2.5D inputs of a box across its array ``axis``: (N, 2k+1, H, W) slice stacks and (N, H, W)
    centre labels, slices taken as inference takes them (the axis moved to the front)."""
    image, labels = image.movedim(axis, 0), labels.movedim(axis, 0)
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


def _validation_set(
    anatomies: Sequence[Anatomy], spec: MemberRecipe, boxes: int = 6, heldout: Sequence[Anatomy] = ()
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation boxes (seeded): from ``heldout`` anatomies when given, each knee as it is (no
    anatomy augmentation: the held-out shapes are what is measured) and the same number of boxes
    from every knee (at least two); otherwise from the training ``anatomies`` with the training
    augmentation."""
    if heldout:
        # One synthesizer per knee: drawing knees at random gave one member all six boxes from the
        # bones-only clinical knee, so its checkpoints were chosen without any cartilage or meniscus.
        settings = SynthesisSettings(noise_range=spec.noise_range, anatomy=AnatomySettings(probability=0.0))
        per_knee = max(2, math.ceil(boxes / len(heldout)))
        validation = []
        for index, knee in enumerate(heldout):
            synthesizer = _synthesizer([knee], spec, seed=20_000 + spec.seed + index, settings=settings)
            validation += [
                stacks_from_box(*synthesizer.sample(), spec.context_slices, spec.slice_axis) for _ in range(per_knee)
            ]
        return validation
    synthesizer = _synthesizer(anatomies, spec, seed=10_000 + spec.seed)
    return [stacks_from_box(*synthesizer.sample(), spec.context_slices, spec.slice_axis) for _ in range(boxes)]


@torch.no_grad()
def validate(network: torch.nn.Module, validation: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    network.eval()
    predictions, targets = [], []
    for inputs, target in validation:
        device = next(network.parameters()).device
        predictions.append(network(inputs.to(device)).argmax(1).cpu())
        targets.append(target)
    network.train()
    return dice_per_class(torch.cat(predictions), torch.cat(targets), NUM_CLASSES)


def train_member(
    anatomies: list[Anatomy],
    spec: MemberRecipe,
    workdir: Path,
    time_budget_s: float,
    progress: Callable[[str, float, str], None] | None = None,
    validate_every: int = 150,
    loss: str = "dice-ce",
    device: str = "cpu",
    heldout: Sequence[Anatomy] = (),
    initial: torch.nn.Module | None = None,
    workers: int = 0,
) -> Path:
    """Train (or resume) one member for ``time_budget_s`` seconds in total; return best weights.

    ``loss`` is a key of :data:`KneeSegLogic.training.losses.LOSSES`; ``device`` a torch device.
    On a CUDA device the forward pass runs in bfloat16 autocast (mixed precision; the loss and
    the weights stay float32); ``workers`` synthesise boxes in parallel (:func:`training_batches`).
    With ``heldout`` anatomies the best checkpoint is chosen on boxes of those knees (history
    entries say ``"validation": "heldout"``); a run resumed on another validation set than it was
    started with forgets its best score, since Dice on different knees does not compare.
    ``initial`` (a network of the same architecture, e.g. a shipped member) gives the starting
    weights of a run that has no checkpoint yet: fine-tuning, with a fresh optimiser state.
    """
    folder = Path(workdir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    network = build_network(**spec.architecture()).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=spec.learning_rate)
    state = TrainingState()
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True, map_location=device)
        network.load_state_dict(saved["network"])
        optimiser.load_state_dict(saved["optimiser"])
        state = TrainingState(**json.loads(saved["state"]))
    elif initial is not None:
        network.load_state_dict(initial.state_dict())
    validation_name = "heldout" if heldout else "training"
    if state.validation != validation_name:
        state.best_dice, state.validation = -1.0, validation_name
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    mixed_precision = torch.device(device).type == "cuda"
    session: dict[str, Any] = {
        "hardware": hardware(torch.device(device)),
        "synthesis_workers": workers,
        "mixed_precision": "bfloat16" if mixed_precision else None,
        "first_iteration": state.iteration + 1,
        "iterations": 0,
        "seconds": 0.0,
    }
    session_started = time.perf_counter()
    batches = training_batches(anatomies, spec, spec.seed + state.iteration, workers)
    validation = _validation_set(anatomies, spec, heldout=heldout)
    counts = torch.stack(
        [torch.bincount(a.labels.reshape(-1).long(), minlength=NUM_CLASSES)[:NUM_CLASSES].double() for a in anatomies]
    ).sum(0)
    loss_function = make_loss(loss, counts.tolist())
    best = folder / "best.safetensors"
    started = time.perf_counter() - state.elapsed_s
    running: list[float] = []

    def save() -> None:
        state.elapsed_s = time.perf_counter() - started
        session["iterations"] = state.iteration - session["first_iteration"] + 1
        session["seconds"] = round(time.perf_counter() - session_started, 1)
        if session["iterations"] and session not in state.sessions:  # a run that trained nothing is no session
            state.sessions.append(session)
        payload = {
            "network": network.state_dict(),
            "optimiser": optimiser.state_dict(),
            "state": json.dumps(asdict(state)),
        }
        with atomic_file(checkpoint) as temporary:
            torch.save(payload, temporary)
        write_json(state.history, folder / "history.json")
        write_json(state.sessions, folder / "sessions.json")

    try:
        while (elapsed := time.perf_counter() - started) < time_budget_s:
            fraction = elapsed / time_budget_s
            for group in optimiser.param_groups:  # cosine decay over the time budget
                group["lr"] = spec.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * fraction)))
            inputs, targets = (tensor.to(device) for tensor in next(batches))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed_precision):
                logits = network(inputs)
            batch_loss = loss_function(logits.float(), targets)
            optimiser.zero_grad()
            batch_loss.backward()
            optimiser.step()
            state.iteration += 1
            running.append(batch_loss.item())
            if state.iteration % validate_every == 0:
                dice = validate(network, validation)
                mean_dice = float(np.nanmean(dice))
                state.history.append(
                    {
                        "iteration": state.iteration,
                        "elapsed_s": round(elapsed, 1),
                        "loss": round(float(np.mean(running)), 4),
                        "val_dice_mean": round(mean_dice, 4),
                        "validation": validation_name,
                        "val_dice": [None if np.isnan(d) else round(float(d), 4) for d in dice],
                    }
                )
                running = []
                if mean_dice > state.best_dice:
                    state.best_dice = mean_dice
                    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(best))
                save()
                if progress is not None:
                    progress("train", fraction, f"{spec.name}: iteration {state.iteration}, val Dice {mean_dice:.3f}")
    finally:
        batches.close()  # ends the synthesis workers
    if not best.exists():
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(best))
    save()
    return best


#: The default ensemble: KneeXNet-2.5D's scale space (a fine and a coarse sagittal in-plane
#: resolution, with different noise ranges: noise space) and a coronal and an axial member for
#: context across the sagittal slices (Luan et al.'s multi-planar fusion F = aC + bA + cS, the
#: weights chosen on held-out knees), the coronal one started from the coarse sagittal one and the
#: axial one from the coronal one.
_CORONAL = MemberRecipe(
    "coronal-1.15mm",
    pixel_mm=1.15,
    plane="coronal",
    crop=128,
    noise_range=(0.02, 0.10),
    seed=3,
    start_from="sagittal-1.15mm",
)
DEFAULT_MEMBERS: tuple[MemberRecipe, ...] = (
    MemberRecipe("sagittal-0.75mm", pixel_mm=0.75, crop=160, noise_range=(0.005, 0.06), seed=1),
    MemberRecipe("sagittal-1.15mm", pixel_mm=1.15, crop=128, noise_range=(0.02, 0.10), seed=2),
    _CORONAL,
    replace(_CORONAL, name="axial-1.15mm", plane="axial", seed=4, start_from="coronal-1.15mm"),
)
