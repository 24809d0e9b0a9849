"""Scans in and out: one :class:`Volume` type with exact geometry.

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

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


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
                raise ValueError(
                    f"{len(self.echo_times_ms)} echo times for an array of shape {self.array.shape}"
                )

    @property
    def is_multi_echo(self) -> bool:
        return self.array.ndim == 4

    @property
    def size(self) -> tuple[int, int, int]:
        """Image size in ITK order (i, j, k)."""
        k, j, i = self.array.shape[:3]
        return (i, j, k)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def with_array(self, array: np.ndarray, echo_times_ms: Sequence[float] | None = None) -> "Volume":
        """A volume on the same grid holding ``array`` (3D, or 4D with ``echo_times_ms``)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape[:3]}")
        return replace(self, array=array, echo_times_ms=None if echo_times_ms is None else tuple(echo_times_ms))

    def echo(self, index: int) -> "Volume":
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

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
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
    def from_sitk(cls, image: sitk.Image, echo_times_ms: Sequence[float] | None = None) -> "Volume":
        """The volume of a 3D SimpleITK image (scalar, or vector with one component per echo)."""
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            echo_times_ms=echo_times_ms,
        )


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def read_volume(path: str | Path, echo_times_ms: Sequence[float] | None = None) -> Volume:
    """Read a scan and check that it can be right.

    Parameters
    ----------
    path : str or Path
        NIfTI, NRRD or MHA file, or a folder of DICOM files (one series; multi-echo series are
        split by echo, see :func:`KneeSegLogic.dicom.read_dicom_folder`).
    echo_times_ms : sequence of float, optional
        Echo times for a 4D NIfTI/NRRD file, whose headers do not hold them.

    Raises
    ------
    InputError
        Missing or unreadable file, 2D image, empty volume, NaN/inf voxels, echo times missing or
        not increasing, a folder mixing series, a volume too large for memory.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        from .dicom import read_dicom_folder

        volume = read_dicom_folder(path)
        if echo_times_ms is not None and volume.echo_times_ms is not None:
            if not np.allclose(echo_times_ms, volume.echo_times_ms, atol=1e-3):
                raise InputError(
                    path,
                    f"echo times given ({list(echo_times_ms)} ms) differ from the DICOM headers "
                    f"({list(volume.echo_times_ms)} ms)",
                )
    else:
        volume = _read_image_file(path, echo_times_ms)
    validate_volume(volume, path)
    return volume


def _read_image_file(path: Path, echo_times_ms: Sequence[float] | None) -> Volume:
    if not _is_image_file(path):
        raise InputError(path, f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        check_memory(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(path, f"cannot be read as an image ({_first_line(error)})") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        non_finite = _nifti_non_finite_count(path)
        if non_finite:
            raise InputError(path, f"volume contains {non_finite} NaN or infinite voxels")
    dimension = image.GetDimension()
    if dimension == 2 or (dimension == 3 and image.GetSize()[2] == 1):
        raise InputError(path, f"is a 2D image (size {image.GetSize()}); a 3D scan is needed")
    if dimension == 4:
        # A 4D file (echoes as the 4th dimension): split into 3D echo images on one grid.
        size = list(image.GetSize())
        echoes = [
            sitk.Extract(image, size[:3] + [0], [0, 0, 0, e], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
            for e in range(size[3])
        ]
        image = sitk.Compose(echoes)
    if dimension > 4:
        raise InputError(path, f"has {dimension} dimensions; 3D or 4D (multi-echo) expected")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1 or dimension == 4:
        if echo_times_ms is None:
            echo_times_ms = _header_echo_times(reader)
        if echo_times_ms is None:
            raise InputError(
                path,
                f"holds {components} echoes but no echo times; give them with --echo-times (ms, comma-separated)",
            )
        if len(echo_times_ms) != components:
            raise InputError(path, f"holds {components} echoes but {len(echo_times_ms)} echo times were given")
        check_echo_times(echo_times_ms, path)
        return Volume.from_sitk(image, echo_times_ms)
    if echo_times_ms is not None and len(echo_times_ms) > 1:
        raise InputError(path, f"is a single 3D volume but {len(echo_times_ms)} echo times were given")
    return Volume.from_sitk(image)


def _nifti_non_finite_count(path: Path) -> int:
    """NaN/inf voxels in a NIfTI file, counted from the file itself.

    ITK 5's NIfTI reader (SimpleITK 2.x) silently turns NaN and +-inf into 0, so the check in
    :func:`validate_volume` never sees them (fixed in ITK 6, InsightSoftwareConsortium/ITK#6683).
    """
    import nibabel

    image = nibabel.load(str(path))
    if image.get_data_dtype().kind not in "fc":
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))


# Header keys holding echo times: ours, and Slicer's MultiVolume convention (frame labels with
# EchoTime as the identifying DICOM tag), so multi-echo volumes saved by Slicer load directly.
ECHO_TIMES_KEY = "echo_times_ms"
MULTIVOLUME_LABELS_KEY = "MultiVolume.FrameLabels"
MULTIVOLUME_TAG_KEY = "MultiVolume.FrameIdentifyingDICOMTagName"


def _header_echo_times(reader: sitk.ImageFileReader) -> list[float] | None:
    keys = set(reader.GetMetaDataKeys())
    if ECHO_TIMES_KEY in keys:
        text = reader.GetMetaData(ECHO_TIMES_KEY)
    elif MULTIVOLUME_LABELS_KEY in keys and reader.GetMetaData(MULTIVOLUME_TAG_KEY if MULTIVOLUME_TAG_KEY in keys else MULTIVOLUME_LABELS_KEY).strip() in ("EchoTime", reader.GetMetaData(MULTIVOLUME_LABELS_KEY)):
        text = reader.GetMetaData(MULTIVOLUME_LABELS_KEY)
    else:
        return None
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        return None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages put the useful sentence last ("Description: ...").
    for line in reversed(lines):
        if "Description" in line or "Unable" in line or "not" in line.lower():
            return line.split("Description:")[-1].strip()
    return lines[-1] if lines else type(error).__name__


def check_echo_times(echo_times_ms: Sequence[float] | None, path: str | Path | None = None) -> None:
    """Raise :class:`InputError` unless echo times are present, finite, positive and increasing."""
    if echo_times_ms is None or len(echo_times_ms) == 0:
        raise InputError(path, "echo times are missing")
    times = np.asarray(echo_times_ms, dtype=float)
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise InputError(path, f"echo times must be positive numbers in ms, got {times.tolist()}")
    if np.any(np.diff(times) <= 0):
        raise InputError(path, f"echo times are not increasing: {times.tolist()} ms")


def available_memory_bytes() -> int:
    """Physical memory currently available, from /proc/meminfo (falls back to total pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The pipeline holds several float32 copies of a volume (image, probabilities per class, ...);
# refuse inputs whose raw size alone would take more than this fraction of available memory.
MEMORY_FRACTION = 0.25


def check_memory(path: str | Path, size: Sequence[int], components: int = 1, pixel_id: int | None = None) -> None:
    """Refuse a volume whose voxels would not fit comfortably in memory."""
    voxels = int(np.prod([int(s) for s in size], dtype=np.float64)) * max(components, 1)
    needed = voxels * 4  # float32 working copy
    available = available_memory_bytes()
    if needed > MEMORY_FRACTION * available:
        raise InputError(
            path,
            f"volume of {voxels:,} voxels needs about {needed / 2**30:.1f} GiB per float copy, "
            f"more than this machine can hold ({available / 2**30:.1f} GiB available)",
        )


def validate_volume(volume: Volume, path: str | Path | None = None) -> None:
    """Raise :class:`InputError` for volumes that cannot be a real scan."""
    if volume.array.ndim not in (3, 4):
        raise InputError(path, f"array has {volume.array.ndim} dimensions; 3D or 4D expected")
    if min(volume.array.shape[:3]) < 2:
        raise InputError(path, f"is a 2D image (size {volume.size}); a 3D scan is needed")
    if volume.array.size == 0:
        raise InputError(path, "volume is empty (no voxels)")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.all(np.isfinite(volume.array)):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        raise InputError(path, f"volume contains {bad} NaN or infinite voxels")
    if not np.any(volume.array):
        raise InputError(path, "volume is empty (every voxel is zero)")
    if any(s <= 0 or not np.isfinite(s) for s in volume.spacing):
        raise InputError(path, f"spacing {volume.spacing} is not positive")
    if abs(abs(np.linalg.det(volume.direction)) - 1) > 1e-3:
        raise InputError(path, "direction matrix is not orthonormal")
    if volume.echo_times_ms is not None:
        check_echo_times(volume.echo_times_ms, path)


def write_volume(volume: Volume, path: str | Path, compress: bool = True) -> Path:
    """Write NRRD (``.nrrd``, gzip-compressed), NIfTI (``.nii``/``.nii.gz``) or MHA, atomically.

    The file is written beside its final name and renamed, so a crash never leaves a half file.
    Multi-echo volumes are written as vector images (one component per echo); their echo times go
    into the NRRD/MHA header as ``echo_times_ms``.
    """
    path = Path(path)
    if not _is_image_file(path):
        raise ValueError(f"{path}: unsupported output type; use one of {', '.join(IMAGE_SUFFIXES)}")
    image = volume.to_sitk()
    if volume.echo_times_ms is not None:
        image.SetMetaData(ECHO_TIMES_KEY, " ".join(f"{t:g}" for t in volume.echo_times_ms))
        image.SetMetaData(MULTIVOLUME_LABELS_KEY, ",".join(f"{t:g}" for t in volume.echo_times_ms))
        image.SetMetaData(MULTIVOLUME_TAG_KEY, "EchoTime")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), useCompression=compress)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


# --- reorientation and resampling -------------------------------------------------------------


def orientation_code(volume: Volume) -> str:
    """Three-letter DICOM orientation code of the axes (e.g. ``"PIR"`` for OAI sagittal scans)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.ravel()))


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
    spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(volume.size) * np.asarray(volume.spacing)
    size = np.maximum(1, np.round(extent / spacing)).astype(int)
    # Keep the corner of the field of view: origin moves by half the change of voxel size.
    corner_offset = (spacing - np.asarray(volume.spacing)) / 2
    origin = np.asarray(volume.origin) + volume.direction @ corner_offset
    target = Volume(np.zeros(size[::-1], np.uint8), tuple(spacing), tuple(origin), volume.direction)
    return resample_to_grid(volume, target, is_label=is_label)


INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def resample_to_grid(volume: Volume, reference: Volume, is_label: bool = False, default: float = 0.0,
                     interpolation: str | None = None) -> Volume:
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
