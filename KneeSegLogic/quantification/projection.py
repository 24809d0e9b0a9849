"""Unrolled projection maps of the femoral cartilage: LR position x 5 degree angle bins.

The femoral cartilage is unrolled about the axis of the circle fitted to its sagittal projection
(DOSMA and Thomas et al. both do this): a voxel's column is its angle about the circle centre in
the sagittal plane, in 5 degree bins from -180 to 180 degrees with 0 pointing inferior and
positive angles posterior (so anterior trochlea left, weight-bearing centre middle, posterior
condyles right); its row is its position along the knee's left-right image axis, one row per
slice, ordered **lateral to medial** for left and right knees alike. A cell holds the mean of the
voxels in it; empty cells hold 0 (as in Thomas et al.'s maps).

For comparisons between time points the maps are resampled to 1 mm x 1 mm pixels: rows by the
slice spacing, columns by the arc length ``radius x 5 degrees`` of the fitted circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nrrd
import numpy as np
from matplotlib.figure import Figure
from skimage.transform import resize

from KneeSegLogic.io.outputs import atomic_file

ANGLE_BIN_DEG = 5.0

ANGLE_START_DEG = -180.0

N_ANGLE_BINS = int(360 / ANGLE_BIN_DEG)


def angle_bin(theta_deg: np.ndarray) -> np.ndarray:
    """Column of each angle (degrees in [-180, 180]); 180 joins the last bin."""
    return np.clip(np.floor((theta_deg - ANGLE_START_DEG) / ANGLE_BIN_DEG), 0, N_ANGLE_BINS - 1).astype(np.int64)


@dataclass(frozen=True)
class ProjectionGrid:
    """Shape and physical size of a projection map.

    Attributes
    ----------
    n_rows : int
        Positions along the left-right axis (slices), lateral first.
    row_spacing_mm : float
        Distance between rows (the LR voxel spacing).
    radius_mm : float
        Radius of the fitted femoral circle: a column spans ``radius * 5 degrees`` of arc.
    """

    n_rows: int
    row_spacing_mm: float
    radius_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, N_ANGLE_BINS)

    @property
    def column_width_mm(self) -> float:
        return float(self.radius_mm * np.radians(ANGLE_BIN_DEG))

    @property
    def square_mm_shape(self) -> tuple[int, int]:
        """Shape of the map resampled to 1 mm x 1 mm pixels."""
        return (
            max(1, round(self.n_rows * self.row_spacing_mm)),
            max(1, round(N_ANGLE_BINS * self.column_width_mm)),
        )


def project_mean(
    grid: ProjectionGrid, rows: np.ndarray, columns: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` per cell and the number of voxels per cell (mean 0 where empty)."""
    cell = rows * N_ANGLE_BINS + columns
    size = grid.n_rows * N_ANGLE_BINS
    counts = np.bincount(cell, minlength=size).astype(float)
    sums = np.bincount(cell, weights=values, minlength=size)
    mean = np.divide(sums, counts, out=np.zeros(size), where=counts > 0)
    return mean.reshape(grid.shape), counts.reshape(grid.shape)


def to_square_mm(grid: ProjectionGrid, values: np.ndarray, covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample a map to 1 mm^2 pixels (bilinear), without blending cartilage into empty cells.

    Values and coverage are interpolated separately and divided (normalised interpolation), so the
    zeros of empty cells do not pull edge values down; a pixel is covered where more than half of
    its interpolation weight falls on covered cells.
    """
    shape = grid.square_mm_shape
    weight = covered.astype(float)
    kwargs = {"order": 1, "mode": "edge", "anti_aliasing": False, "preserve_range": True}
    weighted = resize(np.where(covered, values, 0.0) * weight, shape, **kwargs)
    coverage = resize(weight, shape, **kwargs)
    square_covered = coverage > 0.5
    square = np.divide(weighted, coverage, out=np.zeros(shape), where=square_covered)
    return square, square_covered


def write_projection(
    path: Path,
    values: np.ndarray,
    row_spacing_mm: float,
    column_spacing: float,
    column_unit: str,
    title: str,
    value_unit: str,
    diverging: bool = False,
    outline: np.ndarray | None = None,
) -> list[Path]:
    """Write a projection map as NRRD (float32, 2D, axis units in the header) and PNG.

    ``path`` without suffix; returns the two files written (``path.nrrd``, ``path.png``).
    Rows run lateral to medial; columns by angle (``column_unit`` "deg") or arc length ("mm").
    ``diverging`` uses a blue-red scale symmetric about 0 (for differences); ``outline`` (a
    boolean map) is drawn as black contours (e.g. clusters).
    """
    nrrd_path = path.with_suffix(".nrrd")
    png_path = path.with_suffix(".png")
    header = {
        "type": "float",
        "encoding": "gzip",
        "content": title,
        # NRRD lists per-axis fields fastest axis first: columns, then rows.
        "kinds": ["domain", "domain"],
        "labels": [
            "angle from inferior, + posterior" if column_unit == "deg" else "arc length, + posterior",
            "lateral to medial",
        ],
        "units": [column_unit, "mm"],
        "spacings": [float(column_spacing), float(row_spacing_mm)],
        "axis mins": [ANGLE_START_DEG if column_unit == "deg" else 0.0, 0.0],
    }
    with atomic_file(nrrd_path) as temporary:
        nrrd.write(str(temporary), np.ascontiguousarray(values.T, dtype=np.float32), header, index_order="F")

    figure = Figure(figsize=(7.5, 4.0), dpi=110)
    axes = figure.add_subplot()
    width = values.shape[1] * column_spacing
    left = ANGLE_START_DEG if column_unit == "deg" else 0.0
    height = values.shape[0] * row_spacing_mm
    shown = np.ma.masked_where(values == 0, values)
    limit = float(np.max(np.abs(values))) if np.any(values) else 1.0
    scale = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit} if diverging else {"cmap": "viridis"}
    image = axes.imshow(shown, aspect="auto", extent=(left, left + width, height, 0), **scale)
    if outline is not None and outline.any():
        x = left + (np.arange(values.shape[1]) + 0.5) * column_spacing
        y = (np.arange(values.shape[0]) + 0.5) * row_spacing_mm
        axes.contour(x, y, outline.astype(float), levels=[0.5], colors="black", linewidths=1.0)
    axes.set_xlabel(f"{header['labels'][0]} ({column_unit}); anterior left, posterior right")
    axes.set_ylabel("lateral to medial (mm)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=value_unit)
    figure.tight_layout()
    with atomic_file(png_path) as temporary:
        figure.savefig(temporary)
    return [nrrd_path, png_path]
