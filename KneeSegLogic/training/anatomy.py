"""The anatomy bank: complete training knees composed from real bones, cartilage and menisci.

The default model used to learn knee shape from one label map. ``../shared/data/anatomy/`` (see its
README) adds other real knees, none with an MR image and none complete on its own:

- ``patellar_instability_skm/`` (BSD-3-Clause): one clinical knee's femur/patella/tibia label map
  (thick sagittal slices) and the mean femur (with cartilage thickness), tibia and patella of a
  statistical knee model, in one joint pose, millimetres;
- ``pymskt_femur_meshes/`` (MIT): five distal femurs of five right knees with femoral cartilage
  thickness per bone point, millimetres;
- ``jam_smith2019_knee/`` (Apache-2.0): one right knee's tibia, fibula, patella, tibial and patellar
  cartilage and both menisci, **metres**, tibia/fibula/menisci/tibial cartilage in the tibia's body
  frame and patella/patellar cartilage in the patella's.

This module turns them into label maps with KneeSeg label values (:mod:`KneeSegLogic.tissues`):

1. meshes are read (STL/VTK), scaled to mm and **voxelised** with VTK's
   ``vtkPolyDataToImageStencil`` on a grid of our choice (open meshes first get their holes filled);
2. each bone is **aligned to the knee it joins** by a similarity ICP written here (trimmed
   point-to-point, Umeyama's closed-form step, started from the 24 axis-aligned orientations, or 48
   with mirror images for a mesh of unknown side) onto the surface of the same bone in a *host*
   knee; cartilage and menisci are **carried with their bone** by the same transform;
3. femoral cartilage is **grown from the thickness arrays** by moving every bone point along the
   bone's outward normal by its thickness and voxelising the moved surface minus the bone.

Knees are written by :func:`build_bank` into a folder ``kneeseg train`` reads as data: training
knees at the top level (``<name>.nrrd``) and **held-out knees in ``heldout/``**, which
:func:`KneeSegLogic.training.data.load_anatomies` does not read as training data and the builder
uses for every choice and for the held-out numbers of the model card. ``bank.json`` records each
knee's role, sources and licences, registration residuals and collisions. Build it with::

    python3 -m KneeSegLogic.training.anatomy OUT_FOLDER [--anatomy ../shared/data/anatomy] [--shape-model DIR]

``--shape-model`` adds a training knee per subject of a statistical lower-limb shape model (26
adults' femur, tibia with fibula and patella, MPL-2.0), exported to ``DIR`` once by
:mod:`KneeSegLogic.training.shape_model_export` in an environment with GIAS3: each bone is
registered onto the host's and the host's cartilage and menisci stay on them.

Coordinates: meshes and transforms are in patient LPS millimetres of the host knee; label arrays
are in :class:`~KneeSegLogic.io.volume.Volume` array order ``(k, j, i)``.

The data are read from ``../shared/data`` at build time; nothing derived from them is committed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import vtk
from scipy import ndimage
from scipy.spatial import cKDTree
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from KneeSegLogic.io.outputs import write_json
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume, resample_to_spacing
from KneeSegLogic.resources import SAMPLE_DATA
from KneeSegLogic.tissues import tissue

FEMUR, TIBIA, PATELLA, FIBULA = (tissue(k).label for k in ("femur", "tibia", "patella", "fibula"))
FEMORAL_CARTILAGE, PATELLAR_CARTILAGE = tissue("femoral_cartilage").label, tissue("patellar_cartilage").label
MEDIAL_TIBIAL, LATERAL_TIBIAL = tissue("medial_tibial_cartilage").label, tissue("lateral_tibial_cartilage").label
MEDIAL_MENISCUS, LATERAL_MENISCUS = tissue("medial_meniscus").label, tissue("lateral_meniscus").label

#: Labels that go with each bone when that bone is replaced: its cartilage and (for the tibia) the
#: menisci and fibula, which sit on it.
ATTACHED: dict[int, tuple[int, ...]] = {
    FEMUR: (FEMUR, FEMORAL_CARTILAGE),
    TIBIA: (TIBIA, MEDIAL_TIBIAL, LATERAL_TIBIAL, MEDIAL_MENISCUS, LATERAL_MENISCUS, FIBULA),
    PATELLA: (PATELLA, PATELLAR_CARTILAGE),
}

#: The clinical label map's values (1 femur, 2 patella, 3 tibia) in KneeSeg's labelling.
CLINICAL_LABELS = {1: FEMUR, 2: PATELLA, 3: TIBIA}

DEFAULT_ANATOMY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "anatomy"

HOST_LABEL_MAP = SAMPLE_DATA / "knee_labels.nrrd"


@dataclass(frozen=True)
class Source:
    """One public data set a bank knee is made from (cited in the model card)."""

    key: str
    description: str
    origin: str
    licence: str


SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source(
            "pymskt_knee",
            "bundled knee label map (Resources/SampleData/knee_labels.nrrd): bones, cartilage, menisci, fibula",
            "github.com/gattia/pymskt (data/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd)",
            "MIT",
        ),
        Source(
            "patellar_instability_skm",
            "clinical knee bone label map and statistical knee model mean femur/tibia/patella",
            "github.com/hmc-humble/patellar-instability-skm @ 39ff9ee9881a9992ac260d28cda8021652c915af",
            "BSD-3-Clause",
        ),
        Source(
            "pymskt_femur_meshes",
            "five distal femurs with femoral cartilage thickness",
            "github.com/gattia/pymskt @ 0f56f055fd154befe1e67ce82b2fa2de22dfdff5 (data/femur_meshes_registration)",
            "MIT",
        ),
        Source(
            "jam_smith2019_knee",
            "one knee's tibia, fibula, patella, tibial and patellar cartilage and menisci (Smith et al. 2019)",
            "github.com/opensim-jam-org/jam-resources @ 73306a0f8dce2e31fea2095a27dd449bcd14d9b7",
            "Apache-2.0",
        ),
        Source(
            "llp26_shape_model",
            "femur, patella, tibia and fibula surfaces of the 26 subjects of the LLP26 lower-limb statistical shape "
            "model, aligned bone by bone (exported by KneeSegLogic/training/shape_model_export.py)",
            "pypi.org/project/musculoskeletal-models 0.2.4 (shape_models/LLP26_right_mirrored_from_left_rigid.pc)",
            "MPL-2.0",
        ),
    )
}

JAM_FILES = {
    TIBIA: "smith2019-R-tibia-bone.stl",
    FIBULA: "smith2019-R-fibula-bone.stl",
    PATELLA: "smith2019-R-patella-bone.stl",
    PATELLAR_CARTILAGE: "smith2019-R-patella-cartilage.stl",
    LATERAL_MENISCUS: "smith2019-R-lateral-meniscus.stl",
    MEDIAL_MENISCUS: "smith2019-R-medial-meniscus.stl",
    MEDIAL_TIBIAL: "smith2019-R-tibia-cartilage.stl",  # both plates; split by the nearer meniscus
}

THICKNESS_ARRAY = "thickness (mm)"


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------


def read_mesh(path: Path, scale: float = 1.0) -> vtk.vtkPolyData:
    """A triangle mesh from an STL or legacy VTK file, coordinates multiplied by ``scale`` (to mm)."""
    reader = vtk.vtkSTLReader() if str(path).lower().endswith(".stl") else vtk.vtkPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    mesh = vtk.vtkPolyData()
    mesh.DeepCopy(reader.GetOutput())
    if mesh.GetNumberOfPoints() == 0:
        raise ValueError(f"{path}: no mesh points read")
    if scale != 1.0:
        set_points(mesh, points_of(mesh) * scale)
    return mesh


def points_of(mesh: vtk.vtkPolyData) -> np.ndarray:
    """Mesh point coordinates, shape (n, 3), float64."""
    return vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)


def set_points(mesh: vtk.vtkPolyData, points: np.ndarray) -> None:
    vtk_points = vtk.vtkPoints()
    vtk_points.SetData(numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    mesh.SetPoints(vtk_points)


def open_edge_count(mesh: vtk.vtkPolyData) -> int:
    """Number of boundary edges (edges used by one triangle only); 0 for a closed surface."""
    edges = vtk.vtkFeatureEdges()
    edges.SetInputData(mesh)
    edges.BoundaryEdgesOn()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.NonManifoldEdgesOff()
    edges.Update()
    return int(edges.GetOutput().GetNumberOfCells())


def closed(mesh: vtk.vtkPolyData, hole_size_mm: float = 1000.0) -> vtk.vtkPolyData:
    """The mesh with holes up to ``hole_size_mm`` (bounding-circle radius) filled by VTK."""
    if open_edge_count(mesh) == 0:
        return mesh
    filler = vtk.vtkFillHolesFilter()
    filler.SetInputData(mesh)
    filler.SetHoleSize(hole_size_mm)
    filler.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(filler.GetOutput())
    return out


def transformed(mesh: vtk.vtkPolyData, transform: Similarity) -> vtk.vtkPolyData:
    """A copy of the mesh with its points moved by ``transform`` (point arrays kept)."""
    out = vtk.vtkPolyData()
    out.DeepCopy(mesh)
    set_points(out, transform.apply(points_of(mesh)))
    return out


def outward_normals(mesh: vtk.vtkPolyData) -> np.ndarray:
    """Unit point normals pointing out of a (nearly) closed surface, one per mesh point."""
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(mesh)
    normals.ComputePointNormalsOn()
    normals.ComputeCellNormalsOff()
    normals.SplittingOff()  # keep the point count: thickness arrays index the original points
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.Update()
    result = vtk_to_numpy(normals.GetOutput().GetPointData().GetNormals()).astype(np.float64)
    points = points_of(mesh)
    # AutoOrient needs a closed manifold; check the sign on the mesh as a whole (outward normals
    # point away from the centroid on average) so a mesh with a few open edges is still right.
    if np.mean(np.sum((points - points.mean(0)) * result, axis=1)) < 0:
        result = -result
    return result


def triangle_areas_per_point(mesh: vtk.vtkPolyData) -> np.ndarray:
    """A third of the area (mm^2) of every triangle a point belongs to, per point."""
    polys = vtk_to_numpy(mesh.GetPolys().GetData())
    triangles = polys.reshape(-1, 4)[:, 1:] if polys.size and polys[0] == 3 else _triangles(mesh)
    points = points_of(mesh)
    a, b, c = (points[triangles[:, n]] for n in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    per_point = np.zeros(len(points))
    for n in range(3):
        np.add.at(per_point, triangles[:, n], area / 3)
    return per_point


def _triangles(mesh: vtk.vtkPolyData) -> np.ndarray:
    triangulate = vtk.vtkTriangleFilter()
    triangulate.SetInputData(mesh)
    triangulate.PassLinesOff()
    triangulate.PassVertsOff()
    triangulate.Update()
    return vtk_to_numpy(triangulate.GetOutput().GetPolys().GetConnectivityArray()).reshape(-1, 3)


def point_array(mesh: vtk.vtkPolyData, name: str) -> np.ndarray:
    array = mesh.GetPointData().GetArray(name)
    if array is None:
        raise KeyError(f"mesh has no point array {name!r}")
    return vtk_to_numpy(array).astype(np.float64).reshape(mesh.GetNumberOfPoints(), -1)[:, 0]


def voxelise(mesh: vtk.vtkPolyData, grid: Volume) -> np.ndarray:
    """Voxels of ``grid`` whose centres lie inside the closed mesh (LPS mm); bool, array order (k, j, i).

    The mesh is moved into the grid's index frame scaled by the spacing (``direction^T (p - origin)``),
    where the grid is axis-aligned, and rasterised by ``vtkPolyDataToImageStencil``.
    """
    local = (points_of(mesh) - np.asarray(grid.origin)) @ grid.direction
    moved = vtk.vtkPolyData()
    moved.DeepCopy(mesh)
    set_points(moved, local)
    nx, ny, nz = grid.size
    stencil = vtk.vtkPolyDataToImageStencil()
    stencil.SetInputData(moved)
    stencil.SetOutputOrigin(0.0, 0.0, 0.0)
    stencil.SetOutputSpacing(*grid.spacing)
    stencil.SetOutputWholeExtent(0, nx - 1, 0, ny - 1, 0, nz - 1)
    stencil.Update()
    to_image = vtk.vtkImageStencilToImage()
    to_image.SetInputConnection(stencil.GetOutputPort())
    to_image.SetInsideValue(1)
    to_image.SetOutsideValue(0)
    to_image.SetOutputScalarTypeToUnsignedChar()
    to_image.Update()
    values = vtk_to_numpy(to_image.GetOutput().GetPointData().GetScalars())
    return values.reshape(nz, ny, nx).astype(bool)


def grown_cartilage(bone: vtk.vtkPolyData, thickness_mm: np.ndarray, grid: Volume) -> np.ndarray:
    """Cartilage grown on a bone surface: the bone moved out along its normals by ``thickness_mm``,
    voxelised, minus the bone. Points with zero thickness stay on the bone and add nothing."""
    outer = vtk.vtkPolyData()
    outer.DeepCopy(bone)
    set_points(outer, points_of(bone) + outward_normals(bone) * np.clip(thickness_mm, 0, None)[:, None])
    return voxelise(outer, grid) & ~voxelise(bone, grid)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Similarity:
    """``p -> matrix @ p + translation`` (LPS mm); ``matrix`` = scale x rotation (x a mirror)."""

    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) @ self.matrix.T + self.translation

    def then(self, other: Similarity) -> Similarity:
        """This transform followed by ``other``."""
        return Similarity(other.matrix @ self.matrix, other.matrix @ self.translation + other.translation)

    @property
    def scale(self) -> float:
        return float(abs(np.linalg.det(self.matrix)) ** (1 / 3))

    @property
    def mirrored(self) -> bool:
        return bool(np.linalg.det(self.matrix) < 0)


def umeyama(source: np.ndarray, target: np.ndarray, with_scale: bool = True) -> Similarity:
    """Least-squares similarity (proper rotation) taking ``source`` points onto ``target`` (Umeyama 1991)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    covariance = t.T @ s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    correction = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        correction[2, 2] = -1
    rotation = u @ correction @ vt
    scale = float(np.trace(np.diag(singular) @ correction) / np.mean(np.sum(s**2, axis=1))) if with_scale else 1.0
    matrix = scale * rotation
    return Similarity(matrix, mu_t - matrix @ mu_s)


def _axis_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes."""
    rotations = []
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), permutation] = signs
            if np.linalg.det(matrix) > 0:
                rotations.append(matrix)
    return rotations


@dataclass(frozen=True)
class Registration:
    transform: Similarity
    rms_mm: float  # trimmed RMS distance from transformed source points to the target surface
    inlier_fraction: float
    iterations: int = 0  # ICP iterations of the refinement


@dataclass(frozen=True)
class IcpSettings:
    """Sizes of :func:`register_surfaces`: points and iterations of the coarse search over starting
    orientations and of the refinement, and the change of RMS (mm) below which ICP has converged.

    The defaults build the bank; tests on coarse grids use fewer points (the result differs by a
    fraction of the grid spacing)."""

    coarse_points: int = 600
    coarse_iterations: int = 30
    fine_points: int = 6000
    fine_iterations: int = 200
    tolerance_mm: float = 1e-6


def _trim_threshold(distance: np.ndarray, trim: float) -> float:
    """The ``trim`` quantile of ``distance`` (the order statistic below it; ``np.partition`` is
    several times faster than ``np.quantile`` and ICP takes it twice per iteration)."""
    rank = min(int(trim * (len(distance) - 1)), len(distance) - 1)
    return float(np.partition(distance, rank)[rank])


def _icp(
    source: np.ndarray,
    target: cKDTree,
    start: Similarity,
    iterations: int,
    trim: float,
    with_scale: bool,
    tolerance_mm: float = 1e-6,
) -> Registration:
    """Symmetric trimmed ICP: pairs from source to target and from target to source, each direction's
    worst ``1 - trim`` dropped, so a bone cut shorter in either surface still finds its match."""
    transform = start
    rms = np.inf
    kept = np.ones(len(source), bool)
    done = 0
    while done < iterations:
        done += 1
        moved = transform.apply(source)
        distance, nearest = target.query(moved)
        kept = distance <= _trim_threshold(distance, trim)
        back_distance, back_nearest = cKDTree(moved).query(target.data)
        back_kept = back_distance <= _trim_threshold(back_distance, trim)
        pairs_from = np.concatenate([moved[kept], moved[back_nearest[back_kept]]])
        pairs_to = np.concatenate([target.data[nearest[kept]], target.data[back_kept]])
        transform = transform.then(umeyama(pairs_from, pairs_to, with_scale))
        new_rms = float(np.sqrt(np.mean(np.concatenate([distance[kept], back_distance[back_kept]]) ** 2)))
        converged = abs(rms - new_rms) < tolerance_mm
        rms = new_rms
        if converged:
            break
    return Registration(transform, rms, float(kept.mean()), done)


def register_surfaces(
    source: np.ndarray,
    target: np.ndarray,
    allow_mirror: bool = False,
    trim: float = 0.85,
    with_scale: bool = True,
    seed: int = 0,
    settings: IcpSettings | None = None,
) -> Registration:
    """Similarity transform taking surface points ``source`` onto surface points ``target`` (mm).

    Trimmed ICP: each iteration pairs every source point with its nearest target point, drops the
    worst ``1 - trim`` (a distal femur mesh covers only part of a femur with a long shaft, or the
    reverse) and solves for the best similarity in closed form. Meshes come in unrelated frames, so
    ICP starts from the 24 axis-aligned orientations about the centroids (48 with mirror images when
    ``allow_mirror``, for a mesh whose side is unknown), scaled to equal RMS radius, on
    ``settings.coarse_points`` points (default 600); the best start is refined on up to
    ``settings.fine_points`` (6000).
    """
    settings = settings or IcpSettings()
    rng = np.random.default_rng(seed)
    rng_target = target[rng.choice(len(target), min(settings.fine_points, len(target)), replace=False)]
    tree = cKDTree(rng_target)
    coarse_tree = cKDTree(rng_target[: int(2.5 * settings.coarse_points)])
    coarse = source[rng.choice(len(source), min(settings.coarse_points, len(source)), replace=False)]
    fine = source[rng.choice(len(source), min(settings.fine_points, len(source)), replace=False)]
    centre_s, centre_t = source.mean(0), target.mean(0)
    radius_ratio = np.sqrt(np.mean(np.sum((target - centre_t) ** 2, 1)) / np.mean(np.sum((source - centre_s) ** 2, 1)))
    mirrors = [np.eye(3), np.diag([-1.0, 1.0, 1.0])] if allow_mirror else [np.eye(3)]
    best: Registration | None = None
    for mirror in mirrors:
        for rotation in _axis_rotations():
            matrix = radius_ratio * rotation @ mirror
            start = Similarity(matrix, centre_t - matrix @ centre_s)
            result = _icp(
                coarse, coarse_tree, start, settings.coarse_iterations, trim, with_scale, settings.tolerance_mm
            )
            if best is None or result.rms_mm < best.rms_mm:
                best = result
    assert best is not None
    return _icp(fine, tree, best.transform, settings.fine_iterations, trim, with_scale, settings.tolerance_mm)


def surface_points(mask: np.ndarray, grid: Volume, limit: int = 20_000, seed: int = 0) -> np.ndarray:
    """LPS mm points on a mask's surface (the 0.5 isosurface between its voxels and the rest, where a
    mesh of the same structure lies), at most ``limit`` of them.

    Voxel centres of the boundary would lie half a voxel inside that surface and make every bone
    registered onto them half a voxel too small. Where the mask touches the array border (a bone
    cut by the field of view) the cut face is not bone surface and is left out."""
    from KneeSegLogic.quantification.surfaces import extract_surface

    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return np.zeros((0, 3))
    box = found[0]
    index_points, _ = extract_surface(mask[box], np.eye(4), [b.start for b in box])  # (i, j, k) indices
    size = np.asarray(mask.shape[::-1], dtype=np.float64)
    # The cap closing a cut lies half a voxel outside the array.
    keep = np.all((index_points > -0.25) & (index_points < size - 0.75), axis=1)
    index_points = index_points[keep]
    if len(index_points) > limit:
        index_points = index_points[np.random.default_rng(seed).choice(len(index_points), limit, replace=False)]
    return np.asarray(grid.origin) + (index_points * np.asarray(grid.spacing)) @ grid.direction.T


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


@dataclass
class ComposedKnee:
    """A bank knee: the label map and what it was made of."""

    name: str
    labels: Volume
    role: str  # "train" or "heldout"
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    registrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    collisions_mm3: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        counts = np.bincount(self.labels.array.ravel(), minlength=11)
        return {
            "name": self.name,
            "role": self.role,
            "sources": self.sources,
            "licences": sorted({SOURCES[s].licence for s in self.sources}),
            "notes": self.notes,
            "registrations": self.registrations,
            "collisions_mm3": self.collisions_mm3,
            "volumes_mm3": {
                tissue(v).key: round(float(counts[v] * self.labels.voxel_volume_mm3), 1)
                for v in range(1, 11)
                if counts[v]
            },
        }


#: The bone each soft structure lies on: cartilage meshes reach into their own bone, which is no collision.
OWN_BONE = {
    FEMORAL_CARTILAGE: FEMUR,
    PATELLAR_CARTILAGE: PATELLA,
    MEDIAL_TIBIAL: TIBIA,
    LATERAL_TIBIAL: TIBIA,
    MEDIAL_MENISCUS: TIBIA,
    LATERAL_MENISCUS: TIBIA,
}


def paint(labels: np.ndarray, mask: np.ndarray, value: int, free: np.ndarray) -> int:
    """Set ``value`` where ``mask`` and ``free`` (voxels the new structure may take); returns how many
    voxels of ``mask`` collided with structures other than its own bone and were left to them."""
    labels[mask & free] = value
    return int(np.count_nonzero(mask & ~free & (labels != OWN_BONE.get(value, value))))


def _registration_record(name: str, result: Registration) -> dict[str, Any]:
    return {
        "onto": name,
        "rms_mm": round(result.rms_mm, 3),
        "iterations": result.iterations,
        "scale": round(result.transform.scale, 4),
        "mirrored": result.transform.mirrored,
    }


def split_tibial_cartilage(
    cartilage: np.ndarray, labels: np.ndarray, spacing: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Medial/lateral tibial cartilage labels for a single mask of both plates: each voxel takes the
    side of the nearer meniscus (the menisci rim their own plate). ``spacing`` per array axis (mm)."""
    to_medial = ndimage.distance_transform_edt(labels != MEDIAL_MENISCUS, sampling=spacing)
    to_lateral = ndimage.distance_transform_edt(labels != LATERAL_MENISCUS, sampling=spacing)
    return np.where(to_medial <= to_lateral, MEDIAL_TIBIAL, LATERAL_TIBIAL).astype(np.uint8) * cartilage


class Composer:
    """Builds knees on one grid by replacing bones of a host knee with registered real ones.

    ``host`` is a complete label map (KneeSeg values), resampled to ``spacing_mm`` (isotropic);
    every replacement bone is registered onto the host's bone of the same kind unless a transform
    is given (``icp`` sizes the registrations), and its attached structures are carried by the same
    transform.
    """

    def __init__(self, host: Volume, spacing_mm: float = 0.5, icp: IcpSettings | None = None) -> None:
        self.grid = resample_to_spacing(host, (spacing_mm,) * 3, is_label=True)
        self.icp = icp or IcpSettings()
        self.host = self.grid.array.astype(np.uint8)
        self.spacing_kji = np.asarray(self.grid.spacing_kji)

    def host_surface(self, label: int) -> np.ndarray:
        return surface_points(self.host == label, self.grid)

    def register(self, mesh: vtk.vtkPolyData, label: int, allow_mirror: bool = False) -> Registration:
        return register_surfaces(
            points_of(mesh), self.host_surface(label), allow_mirror=allow_mirror, settings=self.icp
        )

    def compose(
        self,
        knee: ComposedKnee,
        bones: dict[int, vtk.vtkPolyData],
        soft: dict[int, np.ndarray],
        start: np.ndarray | None = None,
    ) -> ComposedKnee:
        """Paint ``bones`` (meshes already in host LPS mm) and ``soft`` masks (already on the grid)
        over the host (or ``start``): the host structures attached to each replaced bone are removed
        first; bones take background and removed voxels, soft tissue then takes what is left of them.
        """
        labels = (self.host if start is None else start).copy()
        for bone in bones:
            labels[np.isin(labels, ATTACHED.get(bone, (bone,)))] = 0
        free = labels == 0
        for bone, mesh in bones.items():
            mask = voxelise(mesh, self.grid)
            knee.collisions_mm3[tissue(bone).key] = round(paint(labels, mask, bone, free) * self._voxel_mm3, 1)
            free &= ~mask
        for value, mask in soft.items():
            knee.collisions_mm3[tissue(value).key] = round(paint(labels, mask, value, free) * self._voxel_mm3, 1)
            free &= ~mask
        knee.labels = self.grid.with_array(labels)
        return knee

    @property
    def _voxel_mm3(self) -> float:
        return float(np.prod(self.spacing_kji))

    def femoral_cartilage(self, femur: vtk.vtkPolyData) -> np.ndarray:
        return grown_cartilage(femur, point_array(femur, THICKNESS_ARRAY), self.grid)

    def jam_tibia_and_patella(
        self, folder: Path, tibia_onto: Similarity | None = None, patella_onto: Similarity | None = None
    ) -> tuple[dict[int, vtk.vtkPolyData], dict[int, np.ndarray], dict[str, dict[str, Any]]]:
        """The JAM knee's tibia (with fibula, menisci, tibial cartilage) and patella (with cartilage),
        each registered onto the host's bone (or moved by the given transforms)."""
        meshes = {label: closed(read_mesh(folder / name, scale=1000.0)) for label, name in JAM_FILES.items()}
        records = {}
        transforms = {}
        for bone, given in ((TIBIA, tibia_onto), (PATELLA, patella_onto)):
            if given is None:
                result = self.register(meshes[bone], bone)
                records[tissue(bone).key] = _registration_record("host " + tissue(bone).key, result)
                given = result.transform
            transforms[bone] = given
        carried_by = {FIBULA: TIBIA, LATERAL_MENISCUS: TIBIA, MEDIAL_MENISCUS: TIBIA, MEDIAL_TIBIAL: TIBIA}
        carried_by[PATELLAR_CARTILAGE] = PATELLA
        moved = {label: transformed(mesh, transforms[carried_by.get(label, label)]) for label, mesh in meshes.items()}
        bones = {TIBIA: moved[TIBIA], PATELLA: moved[PATELLA], FIBULA: moved[FIBULA]}
        soft: dict[int, np.ndarray] = {}
        for label in (LATERAL_MENISCUS, MEDIAL_MENISCUS, PATELLAR_CARTILAGE):
            soft[label] = voxelise(moved[label], self.grid)
        menisci = np.zeros(self.host.shape, np.uint8)
        menisci[soft[LATERAL_MENISCUS]] = LATERAL_MENISCUS
        menisci[soft[MEDIAL_MENISCUS]] = MEDIAL_MENISCUS
        plates = split_tibial_cartilage(voxelise(moved[MEDIAL_TIBIAL], self.grid), menisci, self.spacing_kji)
        soft[MEDIAL_TIBIAL] = plates == MEDIAL_TIBIAL
        soft[LATERAL_TIBIAL] = plates == LATERAL_TIBIAL
        return bones, soft, records


#: Shape-model bones in the files :mod:`KneeSegLogic.training.shape_model_export` writes.
SHAPE_MODEL_BONES = {"femur": FEMUR, "tibia": TIBIA, "patella": PATELLA, "fibula": FIBULA}

#: Host cartilage and menisci that stay in place on each replaced bone.
SOFT_ON = {
    FEMUR: (FEMORAL_CARTILAGE,),
    TIBIA: (MEDIAL_TIBIAL, LATERAL_TIBIAL, MEDIAL_MENISCUS, LATERAL_MENISCUS),
    PATELLA: (PATELLAR_CARTILAGE,),
}

#: Host bone voxels the new bone leaves empty within this distance (mm) of the host's cartilage or
#: menisci on it become bone: the cartilage stays on bone, with no gap of background under it.
GAP_FILL_MM = 2.0


def read_shape_model_subject(path: Path) -> dict[int, vtk.vtkPolyData]:
    """Bone meshes (mm, the shape model's frame, long axes along z) of one exported subject, by KneeSeg label."""
    from KneeSegLogic.quantification.surfaces import triangle_mesh

    with np.load(path) as arrays:
        return {
            label: triangle_mesh(arrays[f"{key}_points"], arrays[f"{key}_triangles"])
            for key, label in SHAPE_MODEL_BONES.items()
        }


def joint_end(points: np.ndarray, length_mm: float, distal: bool) -> np.ndarray:
    """The ``length_mm`` of a long bone (long axis along z) nearest the knee: its lower end for the
    femur (``distal``), its upper end for the tibia."""
    z = points[:, 2]
    return points[z <= z.min() + length_mm] if distal else points[z >= z.max() - length_mm]


def superior_extent_mm(points: np.ndarray) -> float:
    """Extent (mm) of LPS points along the superior (z) axis."""
    return float(np.ptp(points[:, 2])) if len(points) else 0.0


def fill_gaps(labels: np.ndarray, host: np.ndarray, spacing_kji: np.ndarray) -> int:
    """Give each bone the background voxels that were that bone in the host within
    :data:`GAP_FILL_MM` of its cartilage or menisci (in ``labels``); returns the voxels filled."""
    filled = 0
    for bone, soft in SOFT_ON.items():
        gap = (labels == 0) & (host == bone)
        if not gap.any():
            continue
        near = ndimage.distance_transform_edt(~np.isin(labels, soft), sampling=spacing_kji) <= GAP_FILL_MM
        gap &= near
        labels[gap] = bone
        filled += int(np.count_nonzero(gap))
    return filled


def shape_model_knee(composer: Composer, path: Path, role: str = "train") -> ComposedKnee:
    """The host knee with one shape-model subject's bones: its femur, tibia (with its fibula, which
    moves with it) and patella each registered onto the host's bone (the shape model's bones are
    aligned bone by bone, not in a joint pose); on the femur and tibia only the length the host's
    field of view shows is registered. The host's cartilage and menisci stay in place, whole, over
    the new bones; host bone voxels the new bone leaves empty under them are filled
    (:func:`fill_gaps`), so the bone-cartilage interface stays the host's."""
    bones = read_shape_model_subject(path)
    records = {}
    moved = {}
    for bone, distal in ((FEMUR, True), (TIBIA, False), (PATELLA, None)):
        host_points = composer.host_surface(bone)
        points = points_of(bones[bone])
        if distal is None:
            result = register_surfaces(points, host_points, settings=composer.icp)
        else:
            # The length the host shows, in the subject's size: cropped to the host's length first,
            # then again to that length divided by the scale the first registration found.
            length = superior_extent_mm(host_points)
            result = register_surfaces(joint_end(points, length, distal), host_points, settings=composer.icp)
            length /= result.transform.scale
            result = register_surfaces(joint_end(points, length, distal), host_points, settings=composer.icp)
        records[tissue(bone).key] = _registration_record(f"host {tissue(bone).key}", result)
        moved[bone] = transformed(bones[bone], result.transform)
        if bone == TIBIA:
            moved[FIBULA] = transformed(bones[FIBULA], result.transform)
    soft = {value: composer.host == value for values in SOFT_ON.values() for value in values}
    knee = ComposedKnee(
        f"llp26_{path.stem.removeprefix('llp26_')}",
        composer.grid,
        role,
        ["llp26_shape_model", "pymskt_knee"],
        [
            "femur, tibia with fibula, and patella of one LLP26 shape-model subject, each registered onto the "
            "bundled knee's bone; the bundled knee's cartilage and menisci on them"
        ],
        records,
    )
    knee = composer.compose(knee, moved, soft)
    # The host's cartilage and menisci keep their whole thickness where the new bone is larger
    # (painted after the bones they would only take what the bone left: plates thinned by up to
    # a quarter, a thinning no real knee is tied to).
    for value, mask in soft.items():
        knee.labels.array[mask] = value
    filled = fill_gaps(knee.labels.array, composer.host, composer.spacing_kji)
    knee.notes.append(f"host bone filled under cartilage and menisci: {filled * composer._voxel_mm3:.1f} mm3")
    return knee


def clinical_knee(anatomy: Path) -> ComposedKnee:
    """The clinical bone label map (patellar_instability_skm) in KneeSeg label values."""
    volume = read_volume(anatomy / "patellar_instability_skm" / "segmentation_corrected.nrrd")
    lookup = np.zeros(int(volume.array.max()) + 1, np.uint8)
    for value, label in CLINICAL_LABELS.items():
        lookup[value] = label
    return ComposedKnee(
        "clinical_skm",
        volume.with_array(lookup[volume.array.astype(np.int64)]),
        "heldout",
        ["patellar_instability_skm"],
        ["bones only (femur, tibia, patella); thick 4 mm oblique sagittal slices"],
    )


def femur_on_host(composer: Composer, anatomy: Path, number: int) -> ComposedKnee:
    """Host knee with pymskt femur ``number`` (registered onto the host femur) and cartilage grown from its
    thickness array."""
    femur = read_mesh(anatomy / "pymskt_femur_meshes" / f"{number}_RIGHT_femur.vtk")
    femur = closed(femur, hole_size_mm=5.0)
    result = composer.register(femur, FEMUR)
    moved = transformed(femur, result.transform)
    knee = ComposedKnee(
        f"pymskt_femur{number}_on_host",
        composer.grid,
        "train",
        ["pymskt_knee", "pymskt_femur_meshes"],
        [f"femur and femoral cartilage of pymskt femur mesh {number}; other structures of the bundled knee"],
        {"femur": _registration_record("host femur", result)},
    )
    return composer.compose(knee, {FEMUR: moved}, {FEMORAL_CARTILAGE: composer.femoral_cartilage(moved)})


def ssm_knee(composer: Composer, anatomy: Path) -> ComposedKnee:
    """The statistical model's mean femur/tibia/patella in their own joint pose (placed by registering the
    mean femur onto the host femur), femoral cartilage from the mean thickness, and the JAM knee's
    fibula, menisci, tibial and patellar cartilage carried onto the mean tibia and patella."""
    folder = anatomy / "patellar_instability_skm"
    femur, tibia, patella = (read_mesh(folder / f"mean_mesh_{n}.vtk") for n in range(3))
    placed = composer.register(femur, FEMUR, allow_mirror=True)
    femur, tibia, patella = (transformed(m, placed.transform) for m in (femur, tibia, patella))
    jam_folder = anatomy / "jam_smith2019_knee"
    jam_tibia = closed(read_mesh(jam_folder / JAM_FILES[TIBIA], scale=1000.0))
    jam_patella = closed(read_mesh(jam_folder / JAM_FILES[PATELLA], scale=1000.0))
    onto_tibia = register_surfaces(points_of(jam_tibia), points_of(tibia), settings=composer.icp)
    onto_patella = register_surfaces(points_of(jam_patella), points_of(patella), settings=composer.icp)
    bones, soft, _ = composer.jam_tibia_and_patella(jam_folder, onto_tibia.transform, onto_patella.transform)
    bones.update({FEMUR: femur, TIBIA: tibia, PATELLA: patella})
    soft[FEMORAL_CARTILAGE] = composer.femoral_cartilage(femur)
    knee = ComposedKnee(
        "ssm_mean_jam_soft",
        composer.grid,
        "heldout",
        ["patellar_instability_skm", "jam_smith2019_knee"],
        [
            "femur/tibia/patella: mean shapes of the patellar-instability statistical knee model in its pose",
            "femoral cartilage grown from the mean thickness; fibula, menisci, tibial and patellar cartilage of the "
            "JAM knee carried by registering its tibia/patella onto the mean ones",
        ],
        {
            "ssm_femur": _registration_record("host femur (places the whole model knee)", placed),
            "jam_tibia": _registration_record("mean tibia", onto_tibia),
            "jam_patella": _registration_record("mean patella", onto_patella),
        },
    )
    # The host gives only the grid: start from an empty knee.
    return composer.compose(knee, bones, soft, start=np.zeros_like(composer.host))


def jam_on_host(composer: Composer, anatomy: Path, femur_number: int | None = None) -> ComposedKnee:
    """Host femur (or pymskt femur ``femur_number``) with the JAM knee's tibia, fibula, menisci, tibial
    cartilage, patella and patellar cartilage registered onto the host's tibia and patella."""
    bones, soft, records = composer.jam_tibia_and_patella(anatomy / "jam_smith2019_knee")
    sources = ["pymskt_knee", "jam_smith2019_knee"]
    name = "jam_on_host"
    if femur_number is not None:
        femur = closed(read_mesh(anatomy / "pymskt_femur_meshes" / f"{femur_number}_RIGHT_femur.vtk"), 5.0)
        result = composer.register(femur, FEMUR)
        bones[FEMUR] = transformed(femur, result.transform)
        soft[FEMORAL_CARTILAGE] = composer.femoral_cartilage(bones[FEMUR])
        records["femur"] = _registration_record("host femur", result)
        sources.append("pymskt_femur_meshes")
        name = f"jam_pymskt_femur{femur_number}"
    knee = ComposedKnee(
        name,
        composer.grid,
        "train",
        sources,
        ["tibia, fibula, patella, menisci, tibial and patellar cartilage of the JAM knee in the host's pose"],
        records,
    )
    return composer.compose(knee, bones, soft)


def default_knees(
    anatomy: Path = DEFAULT_ANATOMY,
    host_path: Path = HOST_LABEL_MAP,
    spacing_mm: float = 0.5,
    shape_model: Path | None = None,
) -> Iterator[ComposedKnee]:
    """Every bank knee, one at a time (each takes seconds to a minute): the bundled host knee, four
    pymskt femurs on it, the JAM knee on it (twice, with the host femur and with pymskt femur 5),
    with ``shape_model`` (a folder :mod:`~KneeSegLogic.training.shape_model_export` wrote) the host
    with each shape-model subject's bones, and held out: the clinical knee and the statistical-model
    knee (no bone of the host or of any training knee; its soft tissue is the JAM knee's, warped to
    other bones)."""
    host = read_volume(host_path)
    composer = Composer(host, spacing_mm)
    yield ComposedKnee(
        "pymskt_host", composer.grid.with_array(composer.host), "train", ["pymskt_knee"], ["the bundled knee"]
    )
    for number in (1, 2, 3, 4):
        yield femur_on_host(composer, anatomy, number)
    yield jam_on_host(composer, anatomy)
    yield jam_on_host(composer, anatomy, femur_number=5)
    if shape_model is not None:
        subjects = sorted(Path(shape_model).glob("llp26_subject*.npz"))
        if not subjects:
            raise FileNotFoundError(f"no llp26_subject*.npz in {shape_model} (see shape_model_export.py)")
        for path in subjects:
            yield shape_model_knee(composer, path)
    yield clinical_knee(anatomy)
    yield ssm_knee(composer, anatomy)


BANK_RECORD = "bank.json"

HELDOUT_FOLDER = "heldout"


def build_bank(
    out: Path,
    anatomy: Path = DEFAULT_ANATOMY,
    host_path: Path = HOST_LABEL_MAP,
    spacing_mm: float = 0.5,
    shape_model: Path | None = None,
) -> dict[str, Any]:
    """Write every bank knee (training ones in ``out``, held-out ones in ``out/heldout``) and ``bank.json``.

    Returns the record written to ``bank.json``: per knee its role, sources, licences, registration
    residuals, collisions and structure volumes, and the source table for the model card.
    """
    out = Path(out)
    (out / HELDOUT_FOLDER).mkdir(parents=True, exist_ok=True)
    knees = []
    for knee in default_knees(anatomy, host_path, spacing_mm, shape_model):
        folder = out / HELDOUT_FOLDER if knee.role == "heldout" else out
        write_volume(knee.labels.with_array(knee.labels.array.astype(np.uint8)), folder / f"{knee.name}.nrrd")
        knees.append(knee.record())
    record = {
        "description": "KneeSeg anatomy bank (KneeSegLogic.training.anatomy.build_bank): training knees at the top "
        "level, held-out knees in heldout/.",
        "spacing_mm": spacing_mm,
        "sources": {key: asdict(source) for key, source in SOURCES.items()},
        "knees": knees,
    }
    write_json(record, out / BANK_RECORD)
    return record


def read_bank_record(folder: Path) -> dict[str, Any] | None:
    """``bank.json`` of a bank folder, or None when the folder is not a bank."""
    path = Path(folder) / BANK_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def composition_weights(record: dict[str, Any]) -> dict[str, float]:
    """How often training draws each training knee of a bank record, by knee name (sum 1).

    Knees made the same way (the same list of sources) share one equal part: the 26 shape-model
    knees all carry the bundled knee's cartilage and menisci, and drawn one by one they made 27 of
    33 draws show that one knee's soft tissue (the other soft tissue, the JAM knee's, fell from 2 of
    7 draws to 2 of 33, and held-out cartilage and menisci Dice with it).
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for knee in record["knees"]:
        if knee["role"] == "train":
            groups.setdefault(tuple(knee["sources"]), []).append(knee["name"])
    return {name: 1.0 / (len(groups) * len(names)) for names in groups.values() for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the KneeSeg anatomy bank (label maps for kneeseg train)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--anatomy", type=Path, default=DEFAULT_ANATOMY, help="the shared data/anatomy folder")
    parser.add_argument("--host", type=Path, default=HOST_LABEL_MAP, help="complete host knee label map")
    parser.add_argument("--spacing-mm", type=float, default=0.5)
    parser.add_argument(
        "--shape-model",
        type=Path,
        default=None,
        help="folder of shape-model subjects (KneeSegLogic/training/shape_model_export.py): adds a training knee each",
    )
    args = parser.parse_args(argv)
    record = build_bank(args.out, args.anatomy, args.host, args.spacing_mm, args.shape_model)
    for knee in record["knees"]:
        print(knee["role"], knee["name"], knee["registrations"], knee["collisions_mm3"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
