"""Cartilage thickness in millimetres: bone-side surface to articular surface.

Method
------
The cartilage plate's boundary is taken at voxel faces: every face between a plate voxel and a
non-plate neighbour gives a surface point at the face centre (half a voxel from the voxel centre,
in mm, in the knee frame). Each point is either

- **bone-side** (subchondral): the neighbour is the plate's bone (femur, tibia or patella); or,
  where the neighbour is background or an unlabelled structure, the face's outward normal points
  toward the bone (``normal . bone_direction > 0``: toward the femoral circle's centre, inferior
  for the tibia, anterior for the patella). The direction rule keeps thickness right where the
  segmentation leaves a gap between bone and cartilage or has no bone at all;
- **articular**: every other boundary face (joint space, menisci, other cartilage, the plate's rim).

Thickness at a bone-side point is the Euclidean distance to the nearest articular point, as
pyKNEEr measures it (nearest neighbour from the subchondral to the articular surface), here with
sub-voxel face positions so a slab of N voxels measures N voxel sizes thick, not N - 1, and each
surface smoothed over one voxel step so the staircase of oblique surfaces does not make
cartilage look thinner (it did by about 7 % for a 2 mm shell at 0.3-0.7 mm voxels). Faces whose
normal is at right angles to the bone direction (the plate's rim, and every face along LR) are
neither side: a nearest neighbour there would measure the distance to the plate's edge. Each
cartilage voxel belongs to the column of its nearest bone-side point; a region's thickness is the
mean over the distinct columns its voxels belong to (area-weighted, each column once, whatever
the number of voxels stacked in it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.knee_frame import KneeFrame
from KneeSegLogic.tissues import tissues_in_group

# Neighbours that are another articular tissue: always the articular side of a plate.
_ARTICULAR_NEIGHBOURS = np.array(
    [t.label for t in tissues_in_group("cartilage") + tissues_in_group("meniscus")], dtype=np.int64
)

_TANGENTIAL = 1e-6


@dataclass(frozen=True)
class PlateThickness:
    """Thickness of one cartilage plate.

    Attributes
    ----------
    column_thickness_mm : ndarray, shape (m,)
        Thickness at each bone-side surface point (one column through the cartilage each).
    voxel_column : ndarray of int, shape (n,)
        For each plate voxel (in the order given), the index of its column; -1 when the plate
        has no bone-side or no articular surface.
    """

    column_thickness_mm: np.ndarray
    voxel_column: np.ndarray

    @property
    def voxel_thickness_mm(self) -> np.ndarray:
        """Thickness of each voxel's column (NaN where undefined)."""
        thickness = np.full(self.voxel_column.shape, np.nan)
        defined = self.voxel_column >= 0
        thickness[defined] = self.column_thickness_mm[self.voxel_column[defined]]
        return thickness

    def mean_mm(self, voxels: np.ndarray | None = None) -> float:
        """Mean thickness over the distinct columns of the selected voxels (boolean mask or all)."""
        columns = self.voxel_column if voxels is None else self.voxel_column[voxels]
        columns = np.unique(columns[columns >= 0])
        return float(np.mean(self.column_thickness_mm[columns])) if columns.size else float("nan")


def plate_thickness(
    labels: Volume,
    frame: KneeFrame,
    plate_label: int,
    bone_label: int | None,
    index: tuple[np.ndarray, np.ndarray, np.ndarray],
    coordinates: np.ndarray,
    bone_direction: np.ndarray,
) -> PlateThickness:
    """Thickness of a cartilage plate (see the module docstring).

    Parameters
    ----------
    labels : Volume
        Label map holding the plate.
    frame : KneeFrame
        Frame of the label map.
    plate_label, bone_label : int
        Label values of the cartilage plate and of its bone (``None``: no bone labelled).
    index : tuple of 3 int arrays
        Array indices ``(k, j, i)`` of the plate's voxels.
    coordinates : ndarray, shape (n, 3)
        Frame coordinates (mm) of those voxels, as :meth:`KneeFrame.coordinates` returns them.
    bone_direction : ndarray, shape (n, 3) or (3,)
        Unit vector(s), frame components, from each voxel toward its bone.
    """
    array = labels.array
    bone_direction = np.broadcast_to(bone_direction, coordinates.shape)
    bone_points, articular_points = [], []
    for axis in range(3):
        step = frame.axis_vector(labels, axis)
        normal = step / np.linalg.norm(step)
        for sign in (-1, 1):
            neighbour = list(index)
            neighbour[axis] = index[axis] + sign
            inside = (neighbour[axis] >= 0) & (neighbour[axis] < array.shape[axis])
            neighbour_label = np.zeros(index[0].shape, np.int64)
            neighbour_label[inside] = array[tuple(n[inside] for n in neighbour)]
            face = neighbour_label != plate_label
            toward_bone = bone_direction @ (sign * normal)
            is_bone = neighbour_label == bone_label if bone_label is not None else np.zeros_like(face)
            other_tissue = np.isin(neighbour_label, _ARTICULAR_NEIGHBOURS)
            bone_side = face & (is_bone | (~other_tissue & (toward_bone > _TANGENTIAL)))
            # Rim faces (normal at right angles to the bone direction, e.g. every face along LR)
            # are left out: a nearest neighbour on the rim would measure the distance to the
            # plate's edge instead of through the cartilage.
            articular = face & ~bone_side & (other_tissue | (toward_bone < -_TANGENTIAL))
            points = coordinates + 0.5 * sign * step
            bone_points.append(points[bone_side])
            articular_points.append(points[articular])
    bone = np.concatenate(bone_points)
    articular = np.concatenate(articular_points)
    if len(bone) == 0 or len(articular) == 0:
        return PlateThickness(np.zeros(0), np.full(len(coordinates), -1, np.int64))
    radius = max(labels.spacing)
    column_thickness, _ = cKDTree(_smoothed(articular, radius)).query(_smoothed(bone, radius))
    _, voxel_column = cKDTree(bone).query(coordinates)
    return PlateThickness(column_thickness, voxel_column.astype(np.int64))


def _smoothed(points: np.ndarray, radius: float) -> np.ndarray:
    """Each point replaced by the mean of the points within ``radius`` (itself included).

    Face centres of a voxel surface zigzag about the true surface (the staircase of an oblique
    surface); nearest neighbours between two zigzags cut corners and measure about half a voxel
    too thin. Averaging over one voxel step puts the points back on the mid-surface.
    """
    tree = cKDTree(points)
    pairs = tree.query_pairs(radius, output_type="ndarray")
    sums = points.copy()
    counts = np.ones(len(points))
    for a, b in (pairs.T, pairs.T[::-1]):
        np.add.at(sums, a, points[b])
        np.add.at(counts, a, 1.0)
    return sums / counts[:, None]
