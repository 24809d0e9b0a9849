"""The :class:`Volume` type: a voxel array with exact patient-space geometry, and geometry operations.

Axis order (kept everywhere in the engine)
------------------------------------------
``Volume.array`` is indexed ``array[k, j, i]`` for a 3D scan and ``array[k, j, i, e]`` for a
multi-echo scan, where ``i`` runs along the first image axis (DICOM columns, ITK/NRRD x index),
``j`` along the second (rows) and ``k`` along the slice axis, and ``e`` is the echo index. This is
the order ``SimpleITK.GetArrayFromImage`` returns, so no transpose happens on reading or writing.

Geometry
--------
``spacing``, ``origin`` and ``direction`` are in ITK order (x, y, z) and in patient LPS millimetres,
as DICOM and ITK define them: the physical point of voxel index ``(i, j, k)`` is
``origin + direction @ (spacing * (i, j, k))``. ``direction`` is a 3x3 matrix whose columns are the
unit vectors of the i, j and k axes. Slicer reads NRRD/NIfTI written from this geometry so that every
output overlays its input exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk


def as_triple(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Three numbers as the (x, y, z) tuple a Volume's spacing and origin are."""
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class Volume:
    """A voxel array with its patient-space geometry.

    Parameters
    ----------
    array : ndarray, shape (k, j, i) or (k, j, i, echoes)
        Voxel values (see the module docstring for the axis order).
    spacing : tuple of 3 floats
        Voxel size in mm along i, j, k.
    origin : tuple of 3 floats
        LPS position in mm of the centre of voxel (0, 0, 0).
    direction : ndarray, shape (3, 3)
        Columns are the LPS unit vectors of the i, j, k axes.
    echo_times_ms : tuple of floats or None
        Echo times in milliseconds, one per entry of the last axis of a multi-echo array.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    echo_times_ms: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=float).reshape(3, 3))
        if self.echo_times_ms is not None:
            object.__setattr__(self, "echo_times_ms", tuple(float(t) for t in self.echo_times_ms))
            if self.array.ndim != 4 or self.array.shape[3] != len(self.echo_times_ms):
                raise ValueError(f"{len(self.echo_times_ms)} echo times for an array of shape {self.array.shape}")

    @property
    def is_multi_echo(self) -> bool:
        return self.array.ndim == 4

    @property
    def size(self) -> tuple[int, int, int]:
        """Image size in ITK order (i, j, k)."""
        k, j, i = self.array.shape[:3]
        return (i, j, k)

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (k, j, i): what array functions (scipy,
        scikit-image, distance transforms) need."""
        i, j, k = self.spacing
        return (k, j, i)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def with_array(self, array: np.ndarray, echo_times_ms: Sequence[float] | None = None) -> Volume:
        """A volume on the same grid holding ``array`` (3D, or 4D with ``echo_times_ms``)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape[:3]}")
        return replace(self, array=array, echo_times_ms=None if echo_times_ms is None else tuple(echo_times_ms))

    def region(self, box: tuple[slice, ...]) -> Volume:
        """The sub-volume of array slices ``box`` (k, j, i; steps of 1) on the same physical grid:
        its origin is the physical position of the box's first voxel."""
        start = np.array([b.indices(n)[0] for b, n in zip(box, self.array.shape[:3])])
        origin = np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * start[::-1])
        return replace(self, array=self.array[box], origin=as_triple(origin))

    def echo(self, index: int) -> Volume:
        """The 3D volume of one echo (0-based) of a multi-echo scan."""
        if not self.is_multi_echo:
            raise ValueError("not a multi-echo volume")
        return replace(self, array=np.ascontiguousarray(self.array[..., index]), echo_times_ms=None)

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) voxel indices to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when both volumes sample the same voxel grid (size, spacing, origin, direction)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image (a vector image for multi-echo arrays) with the same geometry."""
        image = sitk.GetImageFromArray(self.array, isVector=self.is_multi_echo)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, echo_times_ms: Sequence[float] | None = None) -> Volume:
        """The volume of a 3D SimpleITK image (scalar, or vector with one component per echo)."""
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            echo_times_ms=None if echo_times_ms is None else tuple(echo_times_ms),
        )


def orientation_code(volume: Volume) -> str:
    """Three-letter DICOM orientation code of the axes (e.g. ``"PIR"`` for OAI sagittal scans)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.ravel()))


def describe(volume: Volume) -> dict[str, Any]:
    """Size (i, j, k), spacing (mm), origin (LPS mm), direction (row-major), echo times (ms) and
    voxel type, as plain JSON-ready values (``kneeseg info --json``)."""
    return {
        "size": list(volume.size),
        "spacing_mm": list(volume.spacing),
        "origin_mm": list(volume.origin),
        "direction": [float(v) for v in volume.direction.ravel()],
        "echo_times_ms": None if volume.echo_times_ms is None else list(volume.echo_times_ms),
        "dtype": str(volume.array.dtype),
    }


def reorient(volume: Volume, code: str = "LPS") -> Volume:
    """Permute and flip axes (no interpolation) so the axes point as near ``code`` as they can.

    ``reorient(reorient(v, "LPS"), orientation_code(v))`` restores ``v`` exactly: only axis
    permutations and flips happen, and the physical position of every voxel is unchanged.
    """
    image = sitk.DICOMOrient(volume.to_sitk(), code)
    return Volume.from_sitk(image, volume.echo_times_ms)


def resample_to_spacing(volume: Volume, spacing: Sequence[float], is_label: bool = False) -> Volume:
    """Resample onto a grid with the given spacing covering the same physical extent.

    The new grid keeps the direction and the outer corner of the field of view (so the extent is
    preserved to within one new voxel). Labels use nearest neighbour; images use B-spline.
    """
    new_spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(volume.size) * np.asarray(volume.spacing)
    size = np.maximum(1, np.round(extent / new_spacing)).astype(int)
    # Keep the corner of the field of view: origin moves by half the change of voxel size.
    corner_offset = (new_spacing - np.asarray(volume.spacing)) / 2
    origin = np.asarray(volume.origin) + volume.direction @ corner_offset
    target = Volume(np.zeros(size[::-1], np.uint8), as_triple(new_spacing), as_triple(origin), volume.direction)
    return resample_to_grid(volume, target, is_label=is_label)


INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def resample_to_grid(
    volume: Volume, reference: Volume, is_label: bool = False, default: float = 0.0, interpolation: str | None = None
) -> Volume:
    """Resample ``volume`` onto the voxel grid of ``reference``.

    ``interpolation`` is ``nearest``, ``linear`` or ``bspline``; by default labels use nearest
    neighbour and images B-spline (probabilities should use ``linear``: it stays in [0, 1]).
    """
    interpolator = INTERPOLATORS[interpolation or ("nearest" if is_label else "bspline")]
    reference_image = sitk.Image([int(s) for s in reference.size], sitk.sitkUInt8)
    reference_image.SetSpacing(reference.spacing)
    reference_image.SetOrigin(reference.origin)
    reference_image.SetDirection(tuple(reference.direction.ravel()))
    image = volume.to_sitk()
    resampled = sitk.Resample(image, reference_image, sitk.Transform(), interpolator, default, image.GetPixelID())
    return Volume.from_sitk(resampled, volume.echo_times_ms)
