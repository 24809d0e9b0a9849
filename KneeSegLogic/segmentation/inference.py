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

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
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


# Where each canonical array axis must point, as (physical LPS axis, sign): the letters of
# CANONICAL_ORIENTATION name the direction an ITK axis (i, j, k) points to (ITK's DICOMOrient).
_TOWARDS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def _physical_axes(direction: np.ndarray) -> list[tuple[int, int]]:
    """(physical axis, sign) each ITK axis of ``direction`` points along most.

    Greedy over the largest absolute direction cosine, one physical axis per image axis, as ITK's
    ``DICOMOrientImageFilter`` assigns them (so oblique scans land on the same canonical axes).
    """
    magnitude = np.abs(np.asarray(direction, dtype=float))
    assigned: list[tuple[int, int]] = [(0, 1)] * 3
    rows, columns = [0, 1, 2], [0, 1, 2]
    for _ in range(3):
        _, row, column = max((magnitude[r, c], r, c) for r in rows for c in columns)
        assigned[column] = (row, 1 if direction[row, column] > 0 else -1)
        rows.remove(row)
        columns.remove(column)
    return assigned


def working_grid(volume: Volume, spacing_ijk: tuple[float, float, float]) -> Volume:
    """An empty grid in the canonical orientation covering ``volume``'s field of view.

    Axes are the input's axes permuted/flipped to :data:`CANONICAL_ORIENTATION` (the geometry
    ``SimpleITK.DICOMOrient`` gives, derived from the direction matrix alone: no image is
    reoriented); ``spacing_ijk`` is the working spacing along the canonical (i, j, k) axes in mm.
    """
    direction = np.asarray(volume.direction, dtype=float)
    size = np.asarray(volume.size, dtype=float)
    spacing_in = np.asarray(volume.spacing, dtype=float)
    axes = _physical_axes(direction)
    source = np.empty(3, int)
    canonical_direction = np.empty((3, 3))
    canonical_origin = np.asarray(volume.origin, dtype=float).copy()
    for target, letter in enumerate(CANONICAL_ORIENTATION):
        physical, sign = _TOWARDS[letter]
        column = next(c for c, (row, _) in enumerate(axes) if row == physical)
        source[target] = column
        flip = axes[column][1] != sign
        canonical_direction[:, target] = -direction[:, column] if flip else direction[:, column]
        if flip:  # the first voxel of a flipped axis is the last one of the input's
            canonical_origin += direction[:, column] * spacing_in[column] * (size[column] - 1)
    old_spacing = spacing_in[source]
    spacing = np.asarray(spacing_ijk, dtype=float)
    extent = size[source] * old_spacing
    new_size = np.maximum(1, np.round(extent / spacing)).astype(int)
    # Keep the outer corner of the field of view where it is.
    origin = canonical_origin + canonical_direction @ ((spacing - old_spacing) / 2)
    return Volume(np.zeros(new_size[::-1], np.uint8), tuple(spacing), tuple(origin), canonical_direction)


def _plane_axis(member: MemberSpec) -> int:
    """Array axis of the canonical grid across a 2D/2.5D member's slices."""
    if member.plane not in PLANE_AXIS:
        raise KneeSegError(f"member {member.name}: plane {member.plane!r} is not one of {sorted(PLANE_AXIS)}")
    return PLANE_AXIS[str(member.plane)]


def member_spacing(member: MemberSpec, native: Volume) -> tuple[float, float, float]:
    """Working spacing (i, j, k) of a member on the canonical grid, in mm."""
    if member.kind == "3d":
        return tuple(member.spacing_mm)  # type: ignore[return-value]
    axis = _plane_axis(member)  # array axis; ITK axis is 2 - axis
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
    """Slices (D, H, W) padded at the bottom and right to multiples of ``multiple``, edge values repeated.

    Repeating the edge, not zeros: a bone cut by the field of view then runs on into the padding as
    it did in every training box (label maps are extended by their border), where a band of zeros
    looked like the bone ending in air. On the fine synthetic scan of the training knee zeros had
    the model stop the tibial and fibular shafts short of the lower edge: fibula Dice 0.808 ->
    0.865, tibia 0.942 -> 0.945 with the edge repeated (benchmarks/boundary_bias.py's scan).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x, (h, w)
    return F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0], (h, w)


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
    assert isinstance(logits, torch.Tensor)  # a plain network's output, not a tuple or dict
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
    spacing_kji = np.asarray(grid.spacing_kji)
    box = knee_box(image, spacing_kji)
    crop = torch.from_numpy(np.ascontiguousarray(image[box]))
    network = package.load_member(index, device)

    def run(batch: int, run_device: torch.device) -> torch.Tensor:
        network.to(run_device)
        if member.kind == "3d":
            if member.patch_size is None:
                raise KneeSegError(f"member {member.name}: a 3D member needs a patch size")
            x, y, z = (int(p) for p in member.patch_size)
            return predict_volume(network, crop, (z, y, x), batch, run_device)  # array order (k, j, i)
        axis = _plane_axis(member)
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


# Reference voxels handled at once: bounds the temporary arrays (a few times the slab's voxels)
# so memory grows linearly with the number of slices.
SLAB_VOXELS = 1 << 23


@dataclass
class _Axis:
    """Linear interpolation along one reference array axis from the source axis it maps to.

    ``low``/``high`` are the source indices either side of each reference index, ``weight`` the
    share of ``high`` and ``inside`` whether the sample lies on the source grid (within half a
    voxel of its end voxels, where ITK's linear interpolator clamps to the end voxel).
    ``matrix`` is the same interpolation as a (reference, source) matrix with the two weights
    of each row (``1 - weight`` at ``low``, ``weight`` at ``high``).
    """

    low: torch.Tensor
    high: torch.Tensor
    weight: torch.Tensor
    inside: torch.Tensor
    matrix: torch.Tensor

    @staticmethod
    def build(position: np.ndarray, length: int, device: torch.device) -> _Axis:
        # ITK's IsInsideBuffer: [-0.5, n - 0.5). Rounded first, so that a sample on the half-voxel
        # edge in exact arithmetic (a common case: grids sharing a corner) follows that rule
        # whichever way float rounding fell.
        edge = np.round(position, 9)
        inside = (edge >= -0.5) & (edge < length - 0.5)
        clamped = np.clip(position, 0, length - 1)
        low = np.minimum(np.floor(clamped), max(length - 2, 0)).astype(np.int64)
        high = np.minimum(low + 1, length - 1)
        weight = (clamped - low).astype(np.float32)
        matrix = np.zeros((len(position), length), np.float32)
        rows = np.arange(len(position))
        np.add.at(matrix, (rows, low), 1 - weight)
        np.add.at(matrix, (rows, high), weight)
        return _Axis(*(torch.from_numpy(a).to(device) for a in (low, high, weight, inside, matrix)))

    def part(self, rows: slice) -> _Axis:
        return _Axis(self.low[rows], self.high[rows], self.weight[rows], self.inside[rows], self.matrix[rows])


def _take(values: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``values.index_select(dim, index)`` by advanced indexing (several times faster on the CPU
    for inner dimensions, where ``index_select`` goes element by element)."""
    return values[(slice(None),) * dim + (index,)]


class GridMap:
    """Trilinear resampling, in torch, between two grids that differ only by axis order, flips,
    spacing and origin (working grids of one scan, and the scan itself).

    Equal to ITK's linear resampling through physical space for such grids (the continuous
    source index along each axis depends on one reference index only), but separable: three 1D
    interpolations instead of eight gathers per voxel. ``arrange`` puts a source array's axes in
    reference order; ``interpolate`` reads it on a slab of reference slices.
    """

    def __init__(self, order: list[int], axes: list[_Axis], source_shape: tuple[int, ...], shape: tuple[int, ...]):
        self.order = order  # source array axis of each reference array axis
        self.axes = axes
        self.source_shape = tuple(source_shape[a] for a in order)  # in reference axis order
        self.shape = tuple(shape)

    @staticmethod
    def between(source: Volume, reference: Volume, device: torch.device) -> GridMap | None:
        """The map from ``source`` onto ``reference``, or None when the grids are oblique to each other."""
        # Continuous source index (i, j, k) = matrix @ reference index + offset.
        to_index = np.diag(1 / np.asarray(source.spacing)) @ source.direction.T
        matrix = to_index @ reference.direction @ np.diag(reference.spacing)
        offset = to_index @ (np.asarray(reference.origin) - np.asarray(source.origin))
        magnitude = np.abs(matrix)
        dominant = magnitude.argmax(axis=0)  # source ITK axis of each reference ITK axis
        if sorted(dominant) != [0, 1, 2]:
            return None
        off_axis = magnitude.copy()
        off_axis[dominant, [0, 1, 2]] = 0
        if off_axis.max() > 1e-6 * magnitude.max():
            return None
        source_shape = source.array.shape[:3]
        order, axes = [], []
        for reference_axis in (2, 1, 0):  # array order (k, j, i)
            source_axis = int(dominant[reference_axis])
            position = matrix[source_axis, reference_axis] * np.arange(reference.size[reference_axis])
            order.append(2 - source_axis)
            axes.append(_Axis.build(position + offset[source_axis], source_shape[2 - source_axis], device))
        return GridMap(order, axes, source_shape, reference.array.shape[:3])

    def arrange(self, values: torch.Tensor) -> torch.Tensor:
        """Source values (..., s0, s1, s2) with their last three axes in reference order, contiguous."""
        lead = list(range(values.ndim - 3))
        return values.permute(lead + [len(lead) + a for a in self.order]).contiguous()

    def slabs(self) -> list[slice]:
        """Slices along reference axis 0 that keep temporaries near :data:`SLAB_VOXELS` voxels."""
        step = max(1, SLAB_VOXELS // max(1, self.shape[1] * self.shape[2]))
        return [slice(start, min(start + step, self.shape[0])) for start in range(0, self.shape[0], step)]

    def interpolate(self, values: torch.Tensor, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Arranged source values (..., n0, n1, n2) interpolated at the reference slab ``rows``.

        Written into ``out`` (shape (..., len(rows), m1, m2)) when given. The two in-plane axes
        go first, on only the few source planes the slab reads, as matrix products with
        ``_Axis.matrix`` (one GEMM over every row, then a batched one: gathering the two
        neighbours of every sample along an inner axis cost about twice as much on the CPU);
        the slab's own axis is then a blend of whole planes straight into the result, with no
        temporaries the size of the output.
        """
        first = self.axes[0].part(rows)
        start, stop = int(first.low.min()), int(first.high.max()) + 1
        lead = values.ndim - 3
        block = values[(slice(None),) * lead + (slice(start, stop),)]
        block = torch.matmul(block, self.axes[2].matrix.T)
        block = torch.matmul(self.axes[1].matrix, block)
        if out is None:
            out = torch.empty(
                (*block.shape[:lead], rows.stop - rows.start, *block.shape[lead + 1 :]),
                dtype=block.dtype,
                device=block.device,
            )
        lows, highs = (first.low - start).tolist(), (first.high - start).tolist()
        for row, (low, high, weight) in enumerate(zip(lows, highs, first.weight.tolist())):
            torch.lerp(block.select(lead, low), block.select(lead, high), weight, out=out.select(lead, row))
        return out

    def clear_outside(self, values: torch.Tensor, rows: slice, fill: float | int) -> torch.Tensor:
        """Set the slab's voxels that lie off the source grid (``_Axis.inside`` false along any axis)
        to ``fill``, in place.

        The inside of a slab is a box (one index range per axis), so this assigns a few planes
        per axis instead of masking every voxel with a 3D mask."""
        for dim, axis in enumerate((self.axes[0].part(rows), self.axes[1], self.axes[2])):
            outside = ~axis.inside
            if bool(outside.any()):
                index: list[slice | torch.Tensor] = [slice(None)] * values.ndim
                index[values.ndim - 3 + dim] = outside
                values[tuple(index)] = fill
        return values

    def cells(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per reference voxel of the slab, the value of its cell's lowest corner in ``values``."""
        axes = [self.axes[0].part(rows), self.axes[1], self.axes[2]]
        for dim, axis in enumerate(axes):
            values = _take(values, dim, axis.low)
        return values

    def corners(self, where: tuple[torch.Tensor, ...], rows: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(flat source index in arranged order, trilinear weight) of the 8 cell corners of the slab
        voxels ``where`` (indices into the slab)."""
        axes = [self.axes[0].part(rows), self.axes[1], self.axes[2]]
        # Per axis once: both neighbours (index, weight) of every voxel, then the 8 combinations.
        sides = []
        for axis, at in zip(axes, where):
            share = axis.weight[at]
            sides.append(((axis.low[at], 1 - share), (axis.high[at], share)))
        (n1, n2) = self.source_shape[1:]
        result = []
        for corner in range(8):
            (i0, w0), (i1, w1), (i2, w2) = (sides[dim][(corner >> (2 - dim)) & 1] for dim in range(3))
            result.append(((i0 * n1 + i1) * n2 + i2, w0 * w1 * w2))
        return result

    def resample(self, values: torch.Tensor, defaults: torch.Tensor) -> torch.Tensor:
        """Arranged source channels (C, n0, n1, n2) on the whole reference grid; ``defaults[c]`` outside."""
        out = torch.empty((values.shape[0], *self.shape), dtype=values.dtype, device=values.device)
        fills = defaults.tolist()
        for rows in self.slabs():
            part = self.interpolate(values, rows, out[:, rows])
            for channel, fill in enumerate(fills):
                self.clear_outside(part[channel], rows, fill)
        return out


def _background_defaults(classes: int, device: torch.device) -> torch.Tensor:
    defaults = torch.zeros(classes, device=device)
    defaults[0] = 1.0  # outside a grid: background
    return defaults


def _empty_grid(volume: Volume) -> Volume:
    """The grid of ``volume`` (its 3D geometry) with an empty uint8 array."""
    return Volume(np.zeros(volume.array.shape[:3], np.uint8), volume.spacing, volume.origin, volume.direction)


def _itk_axes(order: Sequence[int]) -> list[int]:
    """For array axes reordered by ``order`` (new array axis ``m`` is old ``order[m]``): the old ITK
    axis of each new ITK axis (ITK axis ``n`` is array axis ``2 - n``)."""
    return [2 - order[2 - n] for n in range(3)]


def _permuted_grid(grid: Volume, order: Sequence[int]) -> Volume:
    """``grid`` with its array axes reordered (new array axis ``m`` is old array axis ``order[m]``):
    the same voxels in space, stored in another axis order."""
    itk = _itk_axes(order)
    shape = tuple(grid.array.shape[a] for a in order)
    spacing = (grid.spacing[itk[0]], grid.spacing[itk[1]], grid.spacing[itk[2]])
    return Volume(np.zeros(shape, np.uint8), spacing, grid.origin, grid.direction[:, itk])


def _axis_order(source: Volume, target: Volume) -> list[int] | None:
    """``order`` with ``target`` the grid of ``source`` in another array-axis order (see
    :func:`_permuted_grid`), or None when the grids differ otherwise. Compares geometry only."""
    if not np.allclose(source.origin, target.origin, atol=1e-6):
        return None
    for order in itertools.permutations(range(3)):
        itk = _itk_axes(order)
        if (
            tuple(source.array.shape[a] for a in order) == target.array.shape[:3]
            and np.allclose([source.spacing[a] for a in itk], target.spacing, atol=1e-6)
            and np.allclose(source.direction[:, itk], target.direction, atol=1e-6)
        ):
            return list(order)
    return None


def _fuse_on_finest(
    members: list[tuple[Volume, float]], device: torch.device, grid: Volume | None = None
) -> tuple[Volume, torch.Tensor, torch.Tensor | None]:
    """Weighted mean of member softmax maps on the finest member's working grid.

    Returns the grid (an empty Volume: the finest member's, or ``grid``, which may be that grid in
    another array-axis order), the fused channels (C, n0, n1, n2) on ``device`` in that grid's
    array order and the weighted mean member entropy there (None for a single member). Members
    on the grid up to axis order are rearranged (one copy); members on other grids are resampled
    linearly through physical space straight onto it. The working grid holds the knee at working
    resolution, so it is small whatever the input's size; the blend and the entropies are
    computed in place (each full-size temporary here is a fresh allocation the CPU pays for).
    """
    from KneeSegLogic.segmentation.uncertainty import entropy_tensor

    if grid is None:
        grid = _empty_grid(min((volume for volume, _ in members), key=lambda v: v.voxel_volume_mm3))
    total_weight = sum(weight for _, weight in members)
    fused: torch.Tensor | None = None
    mean_entropy = None
    for probabilities, weight in members:
        channels = torch.from_numpy(probabilities.array).to(device).permute(3, 0, 1, 2)
        order = _axis_order(probabilities, grid)
        mapping = None if order is not None else GridMap.between(probabilities, grid, device)
        if order is not None:
            member_map = channels.permute([0] + [1 + a for a in order]).contiguous()
        elif mapping is not None:
            member_map = mapping.resample(mapping.arrange(channels), _background_defaults(channels.shape[0], device))
        else:
            member_map = torch.from_numpy(_channels_on_grid(probabilities, grid)).to(device)
        if len(members) == 1:
            return grid, member_map, None
        share = weight / total_weight
        member_entropy = entropy_tensor(member_map).mul_(share)
        mean_entropy = member_entropy if mean_entropy is None else mean_entropy.add_(member_entropy)
        if fused is not None:
            fused.add_(member_map, alpha=share)
        elif member_map.data_ptr() == channels.data_ptr():  # a view of the member's own array
            fused = member_map * share
        else:
            fused = member_map.mul_(share)
    assert fused is not None
    return grid, fused, mean_entropy


def fuse_on_grid(members: list[tuple[Volume, float]], reference: Volume) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted mean of member softmax maps on ``reference``'s grid, and the mean member entropy.

    Every channel is resampled linearly (through physical space) onto ``reference``: C full-size
    arrays. :func:`fuse_and_decide` gives the labels and uncertainty of the same fused map without
    them; this is for what needs every channel everywhere (calibration of decision offsets).
    Returns ``(probabilities (C, k, j, i), mean member entropy (k, j, i) or None for a single
    member)``.
    """
    grid, fused, mean_entropy = _fuse_on_finest(members, torch.device("cpu"))
    mapping = GridMap.between(grid, reference, torch.device("cpu"))
    if mapping is not None:
        # The grid map's edge rule, as fuse_and_decide's: ITK's agrees except for samples exactly
        # on a half-voxel edge, where its own float rounding decides (and differs between CPUs).
        defaults = _background_defaults(fused.shape[0], fused.device)
        channels = mapping.resample(mapping.arrange(fused), defaults).numpy()
        if mean_entropy is None:
            return channels, None
        return channels, mapping.resample(mapping.arrange(mean_entropy[None]), torch.zeros(1))[0].numpy()
    fused_volume = Volume(fused.permute(1, 2, 3, 0).numpy(), grid.spacing, grid.origin, grid.direction)
    on_reference = _channels_on_grid(fused_volume, reference)
    member_entropy = None
    if mean_entropy is not None:
        member_entropy = resample_to_grid(
            grid.with_array(mean_entropy.numpy()), reference, interpolation="linear"
        ).array
    return on_reference, member_entropy


def _slab_target(array: np.ndarray, rows: slice, device: torch.device) -> torch.Tensor | None:
    """Where a slab of ``array`` is computed: the host array itself on the CPU (no copy), else None
    (a new tensor on the device, copied back by :func:`_store`)."""
    return torch.from_numpy(array[rows]) if device.type == "cpu" else None


def _store(array: np.ndarray, rows: slice, slab: torch.Tensor) -> None:
    """Put a computed slab into the host ``array`` (nothing to do when it was computed in place)."""
    if slab.device.type == "cpu" and slab.data_ptr() == array[rows].ctypes.data:
        return
    array[rows] = slab.cpu().numpy()


def _decide(channels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Channel index of the largest ``channels[c] * factors[c]`` (ties: the lower channel), uint8."""
    best = channels[0] * factors[0]
    decision = torch.zeros(channels.shape[1:], dtype=torch.uint8, device=channels.device)
    for channel in range(1, channels.shape[0]):
        candidate = channels[channel] * factors[channel]
        # torch.where rather than a masked assignment: one pass, no index list.
        decision = torch.where(candidate > best, channel, decision)
        best = torch.maximum(best, candidate)
    return decision


def _mixed_cells(values: torch.Tensor) -> torch.Tensor:
    """Per voxel x, whether the cell x .. x+1 (along every axis) holds unequal ``values``.

    The last voxel along an axis stands for itself (edge values repeat)."""
    n0, n1, n2 = values.shape
    padded = torch.nn.functional.pad(values[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0]
    mixed = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    for d0, d1, d2 in ((0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)):
        mixed |= padded[d0 : d0 + n0, d1 : d1 + n1, d2 : d2 + n2] != values
    return mixed


class FusedProbabilities:
    """The fused softmax on the working grid, read on the reference (input) grid on demand.

    ``fused[c]`` is channel ``c`` resampled linearly onto the reference grid (what
    :func:`fuse_on_grid` computes for every channel), one channel at a time.
    """

    def __init__(self, channels: torch.Tensor, mapping: GridMap) -> None:
        self.channels = channels  # (C, n0, n1, n2) on the device, axes in reference array order
        self.mapping = mapping

    def __len__(self) -> int:
        return int(self.channels.shape[0])

    def __getitem__(self, channel: int) -> np.ndarray:
        out = np.empty(self.mapping.shape, np.float32)
        for rows in self.mapping.slabs():
            target = _slab_target(out, rows, self.channels.device)
            part = self.mapping.interpolate(self.channels[channel], rows, target)
            _store(out, rows, self.mapping.clear_outside(part, rows, 1.0 if channel == 0 else 0.0))
        return out


@dataclass
class Fusion:
    """Labels and uncertainty of the fused ensemble on the reference grid (see :func:`fuse_and_decide`)."""

    channel_index: np.ndarray  # (k, j, i) uint8: decided output channel per voxel
    entropy: np.ndarray  # (k, j, i) float32: normalised entropy of the fused softmax, [0, 1]
    mean_member_entropy: np.ndarray | None  # (k, j, i) float32, ensembles only
    probabilities: FusedProbabilities | np.ndarray  # probabilities[c]: channel c on the reference grid


def fuse_and_decide(
    members: list[tuple[Volume, float]],
    reference: Volume,
    offsets: Sequence[float] | None = None,
    device: torch.device | None = None,
    progress: Callable[[float], None] | None = None,
) -> Fusion:
    """Fused labels and entropy on ``reference``'s grid, equal to deciding on :func:`fuse_on_grid`'s maps.

    Labels are decided (``argmax_c p_c e^{b_c}``, see :func:`calibration.decide_labels`) on the
    working grid. A reference voxel is linearly interpolated from the 8 working voxels of its
    cell, and the decision compares linear functions of the probabilities, so where all 8 corners
    have one label the interpolated voxel has it too: those voxels copy it. Only voxels in cells
    whose corners disagree (the boundaries, a few percent of the voxels) get all channels
    interpolated and decided, so the label map is the one of the full C-channel resampling (up to
    float32 rounding of exact ties) at a fraction of the cost. The entropy of the fused softmax is
    computed from the interpolated channels at those voxels; in the other cells it is the working
    grid's entropy interpolated (the entropy of interpolated probabilities is at least that, by
    concavity: on the 384 x 384 x 160 benchmark knee the difference is below 1/1000 at most
    voxels, see the README; computing it exactly everywhere made fusion slower than resampling
    every channel with ITK). The mean member entropy is linearly resampled as in
    :func:`fuse_on_grid`.

    Runs in torch on ``device`` (CUDA when given one: fusion, entropy and resampling on the GPU;
    otherwise the CPU), reference slab by slab so memory grows linearly with the slices. When the
    working grid is oblique to ``reference`` (not a working grid of the same scan) every channel
    is resampled with :func:`fuse_on_grid` instead. ``progress`` is called with the fraction of
    reference slices done after each slab.
    """
    from KneeSegLogic.segmentation.calibration import decide_labels
    from KneeSegLogic.segmentation.uncertainty import entropy, entropy_tensor

    device = device if device is not None and device.type == "cuda" else torch.device("cpu")
    finest = _empty_grid(min((volume for volume, _ in members), key=lambda v: v.voxel_volume_mm3))
    mapping = GridMap.between(finest, reference, device)
    if mapping is None:
        fused, member_entropy = fuse_on_grid(members, reference)
        return Fusion(decide_labels(fused, offsets), entropy(fused), member_entropy, fused)
    # The working grid in the reference's axis order: members are fused straight into it, so the
    # fused channels need no rearranging copy before they are read slab by slab.
    grid, channels, mean_entropy = _fuse_on_finest(members, device, _permuted_grid(finest, mapping.order))
    mapping = GridMap.between(grid, reference, device)
    assert mapping is not None  # the same grid as above, in another axis order
    classes = channels.shape[0]
    factors = torch.ones(classes, device=device)
    if offsets is not None and np.any(offsets):
        if len(offsets) != classes:
            raise ValueError(f"{len(offsets)} decision offsets for {classes} channels")
        factors = torch.exp(torch.tensor(list(offsets), dtype=torch.float64)).float().to(device)
    channels = mapping.arrange(channels)
    labels = _decide(channels, factors)
    working_entropy = entropy_tensor(channels)
    mean_working = None if mean_entropy is None else mapping.arrange(mean_entropy)
    # Voxels whose cell needs the channels: corners of two labels.
    exact = _mixed_cells(labels)
    flat = channels.reshape(classes, -1)
    shape = mapping.shape
    channel_index = np.empty(shape, np.uint8)
    total = np.empty(shape, np.float32)
    member_total = None if mean_working is None else np.empty(shape, np.float32)
    for rows in mapping.slabs():
        if progress is not None:
            progress(rows.start / shape[0])
        decided = mapping.cells(labels, rows)
        slab_entropy = mapping.interpolate(working_entropy, rows, _slab_target(total, rows, device))
        where = mapping.clear_outside(mapping.cells(exact, rows), rows, False).nonzero(as_tuple=True)
        if where[0].numel():
            sampled = torch.zeros((classes, where[0].numel()), device=device)
            for index, weight in mapping.corners(where, rows):
                sampled.addcmul_(flat[:, index], weight)
            decided[where] = _decide(sampled, factors)
            slab_entropy[where] = entropy_tensor(sampled)
        _store(channel_index, rows, mapping.clear_outside(decided, rows, 0))
        _store(total, rows, mapping.clear_outside(slab_entropy, rows, 0.0))
        if member_total is not None and mean_working is not None:
            member_slab = mapping.interpolate(mean_working, rows, _slab_target(member_total, rows, device))
            _store(member_total, rows, mapping.clear_outside(member_slab, rows, 0.0))
    return Fusion(channel_index, total, member_total, FusedProbabilities(channels, mapping))
