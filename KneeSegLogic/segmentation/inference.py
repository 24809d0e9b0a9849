"""Running a model package on a scan: working grid, predictors, ensemble fusion on the input grid.

Every member works on its own *working grid*: the scan's axes permuted/flipped to the canonical
orientation (sagittal slices first, see :data:`contrast_synthesis.CANONICAL_ORIENTATION`; no
interpolation) and resampled to the member's spacing. Its softmax is mapped back onto the input
grid through physical space (SimpleITK resampling with each grid's own geometry), so results
overlay the input exactly whatever its orientation (oblique directions included). Members are
fused there by the weighted mean of their softmax maps.

Predictors: 2.5D (2k+1 adjacent slices as channels, slices batched), 2D (k = 0) along any plane
(multi-planar ensembles blend planes through member weights, F = a*C + b*A + c*S), and 3D sliding
window (MONAI, overlapping patches batched, Gaussian blending).

Devices: CUDA when present (automatic mixed precision), else CPU. On out-of-memory the batch is
halved until 1, then the member moves to the CPU; every fallback is recorded for results.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.segmentation.normalisation import CANONICAL_ORIENTATION, normalise
from KneeSegLogic.segmentation.package import MemberSpec, ModelPackage

ProgressCallback = Callable[[str, float, str], None]

# Array axis (of the canonical (k, j, i) = (R, I, P) array) that is the slice axis of each plane.
PLANE_AXIS = {"sagittal": 0, "axial": 1, "coronal": 2}

# Foreground for the knee crop: normalised intensity above this, with a margin in mm.
CROP_THRESHOLD = 0.1

CROP_MARGIN_MM = 12.0


def working_grid(volume: Volume, spacing_ijk: tuple[float, float, float]) -> Volume:
    """An empty grid in the canonical orientation covering ``volume``'s field of view.

    Axes are the input's axes permuted/flipped to :data:`CANONICAL_ORIENTATION`; ``spacing_ijk``
    is the working spacing along the canonical (i, j, k) axes in mm.
    """
    geometry = sitk.Image([int(s) for s in volume.size], sitk.sitkUInt8)
    geometry.SetSpacing(volume.spacing)
    geometry.SetOrigin(volume.origin)
    geometry.SetDirection(tuple(volume.direction.ravel()))
    canonical = sitk.DICOMOrient(geometry, CANONICAL_ORIENTATION)
    spacing = np.asarray(spacing_ijk, dtype=float)
    old_spacing = np.asarray(canonical.GetSpacing())
    extent = np.asarray(canonical.GetSize()) * old_spacing
    size = np.maximum(1, np.round(extent / spacing)).astype(int)
    direction = np.asarray(canonical.GetDirection()).reshape(3, 3)
    # Keep the outer corner of the field of view where it is.
    origin = np.asarray(canonical.GetOrigin()) + direction @ ((spacing - old_spacing) / 2)
    return Volume(np.zeros(size[::-1], np.uint8), tuple(spacing), tuple(origin), direction)


def member_spacing(member: MemberSpec, native: Volume) -> tuple[float, float, float]:
    """Working spacing (i, j, k) of a member on the canonical grid, in mm."""
    if member.kind == "3d":
        return tuple(member.spacing_mm)  # type: ignore[return-value]
    axis = PLANE_AXIS[member.plane]  # array axis; ITK axis is 2 - axis
    canonical_spacing = sorted(native.spacing)  # fallback slice spacing: the scan's coarsest
    slice_mm = member.slice_spacing_mm or canonical_spacing[-1]
    spacing = [member.spacing_mm[0], member.spacing_mm[1]]
    spacing.insert(2 - axis, slice_mm)
    return tuple(spacing)  # type: ignore[return-value]


def knee_box(image: np.ndarray, spacing_kji: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the foreground (normalised intensity > 0.1) with a margin, per array axis."""
    foreground = image > CROP_THRESHOLD
    if not foreground.any():
        return tuple(slice(0, n) for n in image.shape)
    box = []
    for axis, n in enumerate(image.shape):
        other = tuple(a for a in range(image.ndim) if a != axis)
        present = np.flatnonzero(foreground.any(axis=other))
        margin = int(np.ceil(CROP_MARGIN_MM / spacing_kji[axis]))
        box.append(slice(max(0, present[0] - margin), min(n, present[-1] + margin + 1)))
    return tuple(box)


@dataclass
class RunLog:
    """What happened on the way: devices used, fallbacks, per-member timings."""

    events: list[str] = field(default_factory=list)
    members: list[dict] = field(default_factory=list)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)), (h, w)


def predict_slices(
    network: torch.nn.Module,
    image: torch.Tensor,
    context: int,
    batch_size: int,
    device: torch.device,
    progress: ProgressCallback | None = None,
    label: str = "",
) -> torch.Tensor:
    """Softmax of a 2D/2.5D network over every slice of ``image`` (D, H, W) -> (C, D, H, W).

    Slice ``d`` sees slices ``d-k .. d+k`` as channels (edge slices repeat the outermost one);
    ``batch_size`` slices go through the network at once.
    """
    depth = image.shape[0]
    padded, (h, w) = _pad_to_multiple(image, 16)
    output: torch.Tensor | None = None
    offsets = torch.arange(-context, context + 1)
    for start in range(0, depth, batch_size):
        centres = torch.arange(start, min(start + batch_size, depth))
        indices = (centres[:, None] + offsets[None, :]).clamp(0, depth - 1)
        batch = padded[indices].to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = network(batch)
        probabilities = logits.float().softmax(1)[..., :h, :w].cpu()
        if output is None:
            output = torch.empty((probabilities.shape[1], depth, h, w), dtype=torch.float32)
        output[:, centres] = probabilities.movedim(0, 1)
        if progress is not None:
            progress(
                "inference", centres[-1].item() / max(depth - 1, 1), f"{label} slice {centres[-1].item() + 1}/{depth}"
            )
    assert output is not None
    return output


def predict_volume(
    network: torch.nn.Module,
    image: torch.Tensor,
    patch_size: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    overlap: float = 0.5,
) -> torch.Tensor:
    """Softmax of a 3D network by MONAI sliding windows: batched patches, Gaussian blending."""
    inputs = image[None, None]
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        logits = sliding_window_inference(
            inputs,
            roi_size=patch_size,
            sw_batch_size=batch_size,
            predictor=network,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device=torch.device("cpu"),
        )
    return logits.float().softmax(1)[0]


def with_memory_fallback(
    run: Callable[[int, torch.device], torch.Tensor], batch_size: int, device: torch.device, log: RunLog
) -> torch.Tensor:
    """Call ``run(batch_size, device)``; on out-of-memory halve the batch, then fall back to CPU."""
    while True:
        try:
            return run(batch_size, device)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size > 1:
                log.events.append(
                    f"out of memory on {device.type} with batch {batch_size}; retrying with {batch_size // 2}"
                )
                batch_size //= 2
            elif device.type != "cpu":
                log.events.append(f"out of memory on {device.type} with batch 1; continuing on cpu")
                device = torch.device("cpu")
            else:
                raise KneeSegError(
                    "out of memory on the CPU even with batch 1; crop the scan or use a machine with more memory"
                ) from None


def member_probabilities(
    package: ModelPackage,
    index: int,
    volume: Volume,
    device: torch.device,
    log: RunLog,
    batch_size: int = 16,
    flip_tta: bool = False,
    progress: ProgressCallback | None = None,
) -> Volume:
    """Softmax of member ``index`` on its working grid, as a multi-channel Volume (channels last).

    The returned volume's array is (k, j, i, C) on the member's working grid; map it to the input
    grid with :func:`fuse_on_grid`.
    """
    member = package.members[index]
    grid = working_grid(volume, member_spacing(member, volume))
    image = resample_to_grid(volume, grid, interpolation="linear").array
    image = normalise(image, member.normalisation)
    spacing_kji = np.asarray(grid.spacing)[::-1]
    box = knee_box(image, spacing_kji)
    crop = torch.from_numpy(np.ascontiguousarray(image[box]))
    network = package.load_member(index, device)

    def run(batch: int, run_device: torch.device) -> torch.Tensor:
        network.to(run_device)
        if member.kind == "3d":
            patch = tuple(int(p) for p in member.patch_size[::-1])  # (x, y, z) -> array (k, j, i)
            return predict_volume(network, crop, patch, batch, run_device)
        axis = PLANE_AXIS[member.plane]
        stacked = crop.movedim(axis, 0)
        result = predict_slices(network, stacked, member.context_slices, batch, run_device, progress, member.name)
        if flip_tta:
            # Mirror left-right (the training saw mirrored knees); average both passes.
            flipped = predict_slices(
                network,
                stacked.flip(0 if axis == 0 else 1),
                member.context_slices,
                batch,
                run_device,
                progress,
                member.name + " (flipped)",
            )
            result = (result + flipped.flip(1 if axis == 0 else 2)) / 2
        return result.movedim(1, axis + 1)

    with torch.inference_mode():
        probabilities = with_memory_fallback(run, batch_size if member.kind != "3d" else 4, device, log)
    classes = probabilities.shape[0]
    full = np.zeros((*image.shape, classes), np.float32)
    full[..., 0] = 1.0  # outside the knee crop: background
    full[box] = probabilities.movedim(0, -1).numpy()
    return Volume(full, grid.spacing, grid.origin, grid.direction)


def _channels_on_grid(probabilities: Volume, reference: Volume) -> np.ndarray:
    """Channels-last probabilities resampled (linearly, through physical space) onto ``reference``,
    channels first: (C, k, j, i). Outside the source grid is background."""
    classes = probabilities.array.shape[-1]
    result = np.empty((classes, *reference.array.shape[:3]), np.float32)
    for c in range(classes):
        channel = Volume(
            np.ascontiguousarray(probabilities.array[..., c]),
            probabilities.spacing,
            probabilities.origin,
            probabilities.direction,
        )
        result[c] = resample_to_grid(channel, reference, interpolation="linear", default=1.0 if c == 0 else 0.0).array
    return result


def fuse_on_grid(members: list[tuple[Volume, float]], reference: Volume) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted mean of member softmax maps on ``reference``'s grid, and the mean member entropy.

    Members are first brought onto the finest member's working grid (small: the knee at working
    resolution) and fused there, with each member's entropy; only the fused channels and the
    mean member entropy are then resampled onto the input grid. Resampling is linear through
    physical space, so members at different resolutions and orientations land on one grid.
    Returns ``(probabilities (C, k, j, i), mean member entropy (k, j, i) or None for a single
    member)``; the latter feeds the mutual information (epistemic uncertainty) of
    :mod:`uncertainty`.
    """
    from KneeSegLogic.segmentation.uncertainty import entropy

    finest = min((volume for volume, _ in members), key=lambda v: v.voxel_volume_mm3)
    total_weight = sum(weight for _, weight in members)
    fused: np.ndarray | None = None
    mean_entropy = None if len(members) == 1 else np.zeros(finest.array.shape[:3], np.float32)
    for probabilities, weight in members:
        if probabilities.same_grid(finest, atol=1e-6):
            member_map = np.moveaxis(probabilities.array, -1, 0)
        else:
            member_map = _channels_on_grid(probabilities, finest)
        fused = (weight / total_weight) * member_map if fused is None else fused + (weight / total_weight) * member_map
        if mean_entropy is not None:
            mean_entropy += (weight / total_weight) * entropy(member_map)
    assert fused is not None
    fused_volume = Volume(np.moveaxis(fused, 0, -1), finest.spacing, finest.origin, finest.direction)
    del fused
    on_reference = _channels_on_grid(fused_volume, reference)
    if mean_entropy is not None:
        mean_entropy = resample_to_grid(
            Volume(mean_entropy, finest.spacing, finest.origin, finest.direction), reference, interpolation="linear"
        ).array
    return on_reference, mean_entropy
