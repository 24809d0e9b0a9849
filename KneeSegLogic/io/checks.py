"""Checks every scan passes before the engine uses it: echo times, memory, values, geometry.

Each check raises :class:`~KneeSegLogic.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.volume import Volume


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages put the useful sentence last ("Description: ...").
    for line in reversed(lines):
        if "Description" in line or "Unable" in line or "not" in line.lower():
            return line.split("Description:")[-1].strip()
    return lines[-1] if lines else type(error).__name__


def parse_echo_times(text: str) -> list[float]:
    """``"10,20,30"`` (or ``;``-separated, as spreadsheets write lists) -> ``[10.0, 20.0, 30.0]`` ms.

    Raises ValueError naming the text when an item is not a number.
    """
    try:
        return [float(t) for t in text.replace(" ", "").replace(";", ",").split(",") if t]
    except ValueError:
        raise ValueError(f"echo times must be comma-separated numbers in ms, got {text!r}") from None


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


# Voxel sizes and fields of view an MR scan can have, in mm: preclinical scanners reach ~0.02 mm
# voxels and whole-body scanners a 500 mm field of view. Outside these the header is wrong, and
# the resampling to the network's working grid would need absurd memory (a 400 mm "slice"
# resampled at 0.6 mm) or crash.
MIN_SPACING_MM = 0.01
MAX_FIELD_OF_VIEW_MM = 600.0

# Fewest voxels along any axis of a scan: a smaller grid cannot hold a knee and breaks the
# network's pooling.
MIN_VOXELS_PER_AXIS = 4


def validate_volume(volume: Volume, path: str | Path | None = None) -> None:
    """Raise :class:`InputError` for volumes that cannot be a real scan."""
    if volume.array.ndim not in (3, 4):
        raise InputError(path, f"array has {volume.array.ndim} dimensions; 3D or 4D expected")
    if min(volume.array.shape[:3]) < 2:
        raise InputError(path, f"is a 2D image (size {volume.size}); a 3D scan is needed")
    if min(volume.array.shape[:3]) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            path, f"size {volume.size} is too small for a scan (at least {MIN_VOXELS_PER_AXIS} voxels along every axis)"
        )
    if volume.array.size == 0:
        raise InputError(path, "volume is empty (no voxels)")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.all(np.isfinite(volume.array)):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        raise InputError(path, f"volume contains {bad} NaN or infinite voxels")
    if not np.any(volume.array):
        raise InputError(path, "volume is empty (every voxel is zero)")
    if any(s <= 0 or not np.isfinite(s) for s in volume.spacing):
        raise InputError(path, f"spacing {volume.spacing} is not positive")
    if min(volume.spacing) < MIN_SPACING_MM:
        raise InputError(
            path, f"spacing {volume.spacing} mm is finer than any MR scan's ({MIN_SPACING_MM} mm); the header is wrong"
        )
    field_of_view = [round(n * s, 1) for n, s in zip(volume.size, volume.spacing)]
    if max(field_of_view) > MAX_FIELD_OF_VIEW_MM:
        raise InputError(
            path,
            f"field of view {field_of_view} mm (size x spacing) is larger than an MR scanner's "
            f"({MAX_FIELD_OF_VIEW_MM:g} mm); the spacing in the header is wrong",
        )
    if not np.all(np.isfinite(volume.direction)) or not np.all(np.isfinite(volume.origin)):
        raise InputError(path, "direction or origin holds NaN or infinite values")
    if abs(abs(np.linalg.det(volume.direction)) - 1) > 1e-3:
        raise InputError(path, "direction matrix is not orthonormal")
    if volume.echo_times_ms is not None:
        check_echo_times(volume.echo_times_ms, path)
