"""Surface models of segmented structures: label map -> closed, smoothed triangle meshes in LPS mm.

Pipeline per structure
----------------------
1. The structure's voxels (cropped to their bounding box and padded with one background voxel,
   so a structure cut by the edge of the scan still gets a closed, capped surface) go through
   ``vtkDiscreteFlyingEdges3D`` in *index space* (i, j, k). On scans finer than the mesh
   resolution (:data:`MESH_RESOLUTION_MM`, 0.5 mm by default) voxels are first merged into
   blocks and the surface is the 0.5 isosurface of the structure's volume fraction per block
   (``vtkFlyingEdges3D``): the boundary keeps its sub-voxel position and the volume, with a
   fraction of the triangles.
2. Points are mapped with the volume's full index-to-LPS matrix
   (``origin + direction @ (spacing * ijk)``), so oblique and left-handed grids land where the
   voxels are; triangles are turned, where needed, so normals point outwards.
3. Optional quadric decimation (``vtkQuadricDecimation``, volume preserving).
4. Smoothing in millimetres: ``"windowed-sinc"`` (default; ``vtkWindowedSincPolyDataFilter`` with
   normalised coordinates, a low-pass filter that barely shrinks), ``"laplacian-idw"`` (the
   KneeBones3Dify inverse-distance Laplacian: 20 iterations, weights 1 / (|e| + 1) with |e| the
   edge length in mm, full step to the weighted mean of the neighbours; it shrinks, and the
   shrinkage is recorded) or ``"none"``.
5. Point normals (``vtkPolyDataNormals``, no splitting, so the mesh stays closed).
6. A mesh check: closed (no boundary edges), manifold (no edge shared by more than two
   triangles), mesh volume (``vtkMassProperties``) against the voxel volume.

Files and coordinate system
---------------------------
``surfaces/<structure key>.stl`` and ``.vtp``, coordinates in LPS millimetres. Slicer converts
model files to its internal RAS space according to a tag in the file, the convention of its
``vtkMRMLModelStorageNode``: the STL header holds ``SPACE=LPS`` (Slicer searches the header for
``SPACE=LPS`` / ``SPACE=RAS``), and the VTP holds a field-data string array named ``SPACE``
whose first value is ``LPS``. Slicer 4.11 and later read both and flip x and y on loading, so
the models overlay the scan they came from.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage
from vtkmodules.util.numpy_support import (
    numpy_to_vtk,
    numpy_to_vtkIdTypeArray,
    vtk_to_numpy,
)
from vtkmodules.vtkCommonCore import vtkObject, vtkPoints, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import (
    vtkFlyingEdges3D,
    vtkMassProperties,
    vtkPolyDataNormals,
    vtkQuadricDecimation,
    vtkWindowedSincPolyDataFilter,
)
from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

from KneeSegLogic.device import cpu_cores
from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.outputs import (
    SURFACES_FOLDER,
    Progress,
    Results,
    atomic_file,
    output_folder,
)
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import TISSUES, Tissue, tissue

SMOOTHING_METHODS = ("windowed-sinc", "laplacian-idw", "none")

COORDINATE_SYSTEM = "LPS"

# Slicer's tag (vtkMRMLModelStorageNode): "SPACE=LPS" in an STL header, field array "SPACE" in VTP.
SPACE_TAG = "SPACE"

# Windowed-sinc settings as Slicer uses them for closed surfaces at its default smoothing
# factor 0.5: pass band 10^(-4 * 0.5), 20 iterations.
WINDOWED_SINC_ITERATIONS = 20

WINDOWED_SINC_PASS_BAND = 0.01

# KneeBones3Dify smoothPatch settings.
IDW_ITERATIONS = 20


def triangle_mesh(points: np.ndarray, triangles: np.ndarray) -> vtkPolyData:
    """A vtkPolyData of triangles from numpy arrays (copied)."""
    vtk_points = vtkPoints()
    vtk_points.SetData(numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    cells = vtkCellArray()
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)
    connectivity = np.ascontiguousarray(triangles, dtype=np.int64).ravel()
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True), numpy_to_vtkIdTypeArray(connectivity, deep=True))
    mesh = vtkPolyData()
    mesh.SetPoints(vtk_points)
    mesh.SetPolys(cells)
    return mesh


def _arrays(mesh: vtkPolyData) -> tuple[np.ndarray, np.ndarray]:
    """Points and triangles of a triangle-only vtkPolyData."""
    if mesh.GetNumberOfPoints() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    points = vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    polys = mesh.GetPolys()
    offsets = vtk_to_numpy(polys.GetOffsetsArray())
    if np.any(np.diff(offsets) != 3):
        raise ValueError("mesh has non-triangle cells")
    triangles = vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return points, triangles


def signed_volume(points: np.ndarray, triangles: np.ndarray) -> float:
    """Volume enclosed by a closed triangle mesh (divergence theorem); > 0 for outward normals."""
    a, b, c = (points[triangles[:, n]] for n in range(3))
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


def edge_counts(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges (e, 2) of a triangle mesh and how many triangles share each."""
    first = triangles.ravel()
    second = triangles[:, [1, 2, 0]].ravel()
    low = np.minimum(first, second)
    high = np.maximum(first, second)
    # One int64 key per edge: a 1D sort is far faster than unique rows.
    n = int(triangles.max()) + 1 if triangles.size else 1
    keys, counts = np.unique(low * n + high, return_counts=True)
    return np.stack([keys // n, keys % n], axis=1), counts


def mesh_check(points: np.ndarray, triangles: np.ndarray) -> dict[str, Any]:
    """Closed and manifold tests of a triangle mesh.

    Returns
    -------
    dict
        ``boundary_edges`` (edges of one triangle), ``non_manifold_edges`` (edges of more than
        two), ``closed`` and ``manifold`` (each True when the matching count is 0).
    """
    if len(triangles) == 0:
        return {"closed": False, "manifold": False, "boundary_edges": 0, "non_manifold_edges": 0}
    _, counts = edge_counts(triangles)
    boundary = int(np.count_nonzero(counts == 1))
    non_manifold = int(np.count_nonzero(counts > 2))
    return {
        "closed": boundary == 0,
        "manifold": non_manifold == 0,
        "boundary_edges": boundary,
        "non_manifold_edges": non_manifold,
    }


def mesh_volume(mesh: vtkPolyData) -> float:
    """Enclosed volume in mm^3 (``vtkMassProperties``)."""
    properties = vtkMassProperties()
    properties.SetInputData(mesh)
    properties.Update()
    return float(properties.GetVolume())


def block_factors(spacing_kji: Sequence[float], resolution_mm: float) -> tuple[int, int, int]:
    """Voxels merged per array axis (k, j, i) for a mesh built at about ``resolution_mm`` (0: none).

    The factor per axis is ``resolution_mm / spacing`` rounded, so blocks are within a factor 1.5
    of ``resolution_mm`` and axes whose voxels exceed a third of it are left as they are.
    """
    if resolution_mm <= 0:
        return (1, 1, 1)
    k, j, i = (max(1, int(np.floor(resolution_mm / float(s) + 0.5))) for s in spacing_kji)
    return (k, j, i)


def block_means(mask: np.ndarray, factors: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mean of a 3D ``mask`` (float32) over blocks of ``factors`` voxels per array axis; the array is
    padded with zeros up to whole blocks, so block ``c`` covers voxels ``c*f .. c*f + f - 1``."""
    factors = [int(f) for f in factors]
    whole = np.pad(np.asarray(mask), [(0, (-n) % f) for n, f in zip(mask.shape, factors)])
    # One strided view per position in the block, added up: several times faster than a reshape
    # and mean over the block axes, which walks the array with small inner strides.
    total: np.ndarray = np.zeros(
        [n // f for n, f in zip(whole.shape, factors)], np.uint16 if whole.dtype == bool else np.float32
    )
    for offsets in itertools.product(*(range(f) for f in factors)):
        np.add(total, whole[tuple(slice(o, None, f) for o, f in zip(offsets, factors))], out=total)
    return (total / np.float32(np.prod(factors))).astype(np.float32, copy=False)


def extract_surface(
    mask: np.ndarray,
    index_to_physical: np.ndarray,
    offset: Sequence[int] = (0, 0, 0),
    block: Sequence[int] = (1, 1, 1),
) -> tuple[np.ndarray, np.ndarray]:
    """Isosurface of a binary mask, in physical coordinates, normals outwards.

    Parameters
    ----------
    mask : ndarray of bool, shape (k, j, i)
        The structure, or the block of it around the structure (crop to its bounding box:
        the cost grows with the block size).
        One background voxel is added all round, so the surface is closed even where the
        structure touches the block's edge.
    index_to_physical : ndarray, shape (4, 4)
        Maps homogeneous (i, j, k, 1) voxel indices of the whole volume to LPS mm
        (:meth:`Volume.index_to_physical`).
    offset : sequence of 3 int
        (k, j, i) index of the block's first voxel in the whole volume.
    block : sequence of 3 int
        Voxels merged per axis (k, j, i), e.g. from :func:`block_factors`. Above 1, the mask is
        averaged over blocks of that many voxels (the structure's volume fraction per block) and
        the surface is the 0.5 isosurface of that fraction (``vtkFlyingEdges3D``): a mesh of
        about the block's size that keeps the sub-voxel boundary position and the volume,
        instead of one triangle pair per voxel face on fine scans.

    Returns
    -------
    points : ndarray, shape (n, 3)
        LPS mm.
    triangles : ndarray, shape (m, 3)
        Point indices, counter-clockwise seen from outside.
    """
    factors = np.asarray(block, dtype=int)
    image = vtkImageData()
    flying_edges: vtkDiscreteFlyingEdges3D | vtkFlyingEdges3D
    if np.all(factors == 1):
        padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
        image.SetOrigin(*(np.asarray(offset, dtype=float)[::-1] - 1.0))  # index space (i, j, k)
        flying_edges = vtkDiscreteFlyingEdges3D()
        flying_edges.SetValue(0, 1)
    else:
        # Block means (background up to whole blocks), one background block all round.
        padded = np.pad(block_means(mask, factors), 1)
        # Block c covers voxels c*f .. c*f + f - 1: its centre is voxel c*f + (f - 1) / 2.
        start = np.asarray(offset, dtype=float) + (factors - 1) / 2.0 - factors
        image.SetOrigin(*start[::-1])
        image.SetSpacing(*factors[::-1].astype(float))
        flying_edges = vtkFlyingEdges3D()
        flying_edges.SetValue(0, 0.5)
    image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(padded.ravel(), deep=True))
    flying_edges.SetInputData(image)
    flying_edges.ComputeNormalsOff()
    flying_edges.ComputeGradientsOff()
    flying_edges.ComputeScalarsOff()
    flying_edges.Update()
    index_points, triangles = _arrays(flying_edges.GetOutput())
    points = index_points @ index_to_physical[:3, :3].T + index_to_physical[:3, 3]
    if len(triangles) and signed_volume(points, triangles) < 0:
        triangles = np.ascontiguousarray(triangles[:, ::-1])
    return points, triangles


def smooth_windowed_sinc(
    points: np.ndarray,
    triangles: np.ndarray,
    iterations: int = WINDOWED_SINC_ITERATIONS,
    pass_band: float = WINDOWED_SINC_PASS_BAND,
) -> np.ndarray:
    """Windowed-sinc low-pass smoothing (Taubin), coordinates normalised; returns new points."""
    smoother = vtkWindowedSincPolyDataFilter()
    smoother.SetInputData(triangle_mesh(points, triangles))
    smoother.SetNumberOfIterations(iterations)
    smoother.SetPassBand(pass_band)
    smoother.NormalizeCoordinatesOn()
    smoother.BoundarySmoothingOff()
    smoother.FeatureEdgeSmoothingOff()
    smoother.NonManifoldSmoothingOn()
    smoother.Update()
    return _arrays(smoother.GetOutput())[0]


def smooth_laplacian_idw(points: np.ndarray, triangles: np.ndarray, iterations: int = IDW_ITERATIONS) -> np.ndarray:
    """Inverse-distance-weighted Laplacian smoothing as in KneeBones3Dify's ``smoothPatch``.

    Each iteration moves every point to the mean of its edge neighbours weighted by
    ``1 / (|e| + 1)``, ``|e|`` the current edge length (mm): a full step with no shrink
    compensation. (smoothPatch counts every edge once per triangle; on a closed manifold mesh
    each neighbour then counts twice, which leaves the weighted mean unchanged.)

    Returns
    -------
    ndarray, shape (n, 3)
        Smoothed points; points on no edge stay where they are.
    """
    edges, _ = edge_counts(triangles)
    source = np.concatenate([edges[:, 0], edges[:, 1]])
    target = np.concatenate([edges[:, 1], edges[:, 0]])
    n = len(points)
    current = np.array(points, dtype=np.float64)
    for _ in range(iterations):
        length = np.linalg.norm(current[edges[:, 0]] - current[edges[:, 1]], axis=1)
        weight = np.tile(1.0 / (length + 1.0), 2)
        total = np.bincount(source, weight, n)
        moved = np.stack([np.bincount(source, weight * current[target, c], n) for c in range(3)], axis=1)
        connected = total > 0
        current[connected] = moved[connected] / total[connected, None]
    return current


def decimate_mesh(points: np.ndarray, triangles: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation removing about ``fraction`` (0-1) of the triangles, volume preserving."""
    decimator = vtkQuadricDecimation()
    decimator.SetInputData(triangle_mesh(points, triangles))
    decimator.SetTargetReduction(fraction)
    decimator.VolumePreservationOn()
    decimator.Update()
    return _arrays(decimator.GetOutput())


def with_normals(points: np.ndarray, triangles: np.ndarray) -> vtkPolyData:
    """The mesh as vtkPolyData with point normals (no splitting: the mesh stays closed)."""
    normals = vtkPolyDataNormals()
    normals.SetInputData(triangle_mesh(points, triangles))
    normals.SplittingOff()
    normals.ConsistencyOff()  # triangles are already oriented outwards
    normals.AutoOrientNormalsOff()
    normals.ComputePointNormalsOn()
    normals.ComputeCellNormalsOff()
    normals.Update()
    return normals.GetOutput()


def structure_surface(
    labels: Volume,
    label: int,
    smoothing: str = "windowed-sinc",
    decimate_fraction: float = 0.0,
    box: tuple[slice, slice, slice] | None = None,
    resolution_mm: float = 0.0,
) -> tuple[vtkPolyData, dict[str, Any]]:
    """Surface of one structure of a label map, with its mesh check.

    Parameters
    ----------
    labels : Volume
        3D label map.
    label : int
        Label value of the structure.
    smoothing : {"windowed-sinc", "laplacian-idw", "none"}
    decimate_fraction : float
        Fraction of triangles to remove, 0 (none) to < 1.
    box : tuple of 3 slices, optional
        The structure's bounding box in the array (``scipy.ndimage.find_objects``), found
        here when not given.
    resolution_mm : float
        Build the mesh on blocks of voxels about this size (:func:`block_factors`; 0: the
        voxels themselves).

    Returns
    -------
    mesh : vtkPolyData
        Triangles in LPS mm with point normals.
    check : dict
        Counts, closed/manifold, ``mesh_volume_mm3`` (``vtkMassProperties``),
        ``voxel_volume_mm3``, ``volume_ratio`` (mesh / voxel) and ``smoothing_volume_change``
        (volume after smoothing / before - 1; negative is shrinkage).
    """
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing must be one of {SMOOTHING_METHODS}, got {smoothing!r}")
    if not 0.0 <= decimate_fraction < 1.0:
        raise ValueError(f"decimation fraction must be in [0, 1), got {decimate_fraction}")
    if box is None:
        found = ndimage.find_objects((labels.array == label).view(np.uint8))
        box = found[0] if found else (slice(0, 0),) * 3
    mask = labels.array[box] == label
    block = block_factors(labels.spacing_kji, resolution_mm)
    points, triangles = extract_surface(mask, labels.index_to_physical(), [s.start for s in box], block)
    if len(triangles) and decimate_fraction > 0:
        points, triangles = decimate_mesh(points, triangles, decimate_fraction)
    before = signed_volume(points, triangles) if len(triangles) else 0.0
    if smoothing == "windowed-sinc" and len(triangles):
        points = smooth_windowed_sinc(points, triangles)
    elif smoothing == "laplacian-idw" and len(triangles):
        points = smooth_laplacian_idw(points, triangles)
    mesh = with_normals(points, triangles)
    voxel_volume = float(np.count_nonzero(mask)) * labels.voxel_volume_mm3
    volume = mesh_volume(mesh) if len(triangles) else 0.0
    check = {
        "points": int(len(points)),
        "triangles": int(len(triangles)),
        **mesh_check(points, triangles),
        "mesh_volume_mm3": round(volume, 3),
        "voxel_volume_mm3": round(voxel_volume, 3),
        "volume_ratio": round(volume / voxel_volume, 5) if voxel_volume else None,
        "smoothing_volume_change": round(volume / before - 1.0, 6) if before else None,
    }
    return mesh, check


#: Default mesh resolution (mm): finer than the default model's 0.75 mm working grid, so the mesh
#: keeps what the model resolves, while a 0.27 mm scan no longer gives one triangle pair per voxel
#: face (136 MB of surfaces for a 512 x 512 x 286 knee). Axes with voxels of 1/3 mm or more are
#: left as they are (:func:`block_factors`).
MESH_RESOLUTION_MM = 0.5

#: One binary STL facet: normal, three vertices (float32 x, y, z each) and a 16-bit attribute word.
STL_FACET = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


def write_stl(mesh: vtkPolyData, path: str | Path) -> Path:
    """Binary STL in LPS mm, header ``SPACE=LPS`` (Slicer's tag for the coordinate system).

    Written from the arrays by Python's file I/O (the format is 80 header bytes, a uint32 facet
    count and 50-byte facets), so a full disk or a file size limit raises the real OS error; VTK's
    writer prints ERR| lines and deletes its file instead.
    """
    path = Path(path)
    points, triangles = _arrays(mesh)
    corners = points[triangles]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    facets = np.zeros(len(triangles), STL_FACET)
    facets["normal"] = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    facets["vertices"] = corners
    header = f"KneeSeg surface. {SPACE_TAG}={COORDINATE_SYSTEM}".encode("ascii").ljust(80, b" ")
    with atomic_file(path) as temporary, open(temporary, "wb") as stream:
        stream.write(header + np.uint32(len(facets)).tobytes() + facets.tobytes())
    return path


def write_vtp(mesh: vtkPolyData, path: str | Path) -> Path:
    """Compressed VTP in LPS mm, field-data string array ``SPACE`` = ``LPS`` (Slicer's tag).

    VTK's messages are silenced while it writes: a failed write is one error, whose cause (full
    disk, file size limit) :func:`~KneeSegLogic.io.outputs.atomic_file` names.
    """
    path = Path(path)
    tagged = vtkPolyData()
    tagged.ShallowCopy(mesh)
    space = vtkStringArray()
    space.SetName(SPACE_TAG)
    space.InsertNextValue(COORDINATE_SYSTEM)
    tagged.GetFieldData().AddArray(space)
    writer = vtkXMLPolyDataWriter()
    writer.SetInputData(tagged)
    writer.SetCompressorTypeToLZ4()  # zlib costs seconds on a femur
    writer.SetDataModeToAppended()
    writer.EncodeAppendedDataOff()  # raw binary: base64 would cost time and a third more space
    with atomic_file(path) as temporary:
        writer.SetFileName(str(temporary))
        shown = vtkObject.GetGlobalWarningDisplay()
        vtkObject.GlobalWarningDisplayOff()
        try:
            written = writer.Write()
        finally:
            vtkObject.SetGlobalWarningDisplay(shown)
        if not written:
            raise KneeSegError(f"{path}: could not write VTP")
    return path


#: Surface file types: binary STL (3D printing, planning software) and VTK XML PolyData (Slicer's
#: model files, compressed). ``kneeseg surfaces`` writes both; ``segment`` writes VTP and, with
#: ``--stl``, STL: on the 512 x 512 x 286 knee the STL files were 34 of the folder's 93 MB and
#: repeat the VTP meshes triangle for triangle.
SURFACE_FORMATS: tuple[str, ...] = ("stl", "vtp")


def build_surfaces(
    labels: Volume,
    out_dir: str | Path,
    smoothing: str = "windowed-sinc",
    decimate: float = 0.0,
    tissues: Sequence[Tissue] = TISSUES,
    progress: Callable[[str, float, str], None] | None = None,
    resolution_mm: float = MESH_RESOLUTION_MM,
    formats: Sequence[str] = SURFACE_FORMATS,
) -> dict[str, Any]:
    """Write ``surfaces/<key>.<format>`` for every structure present; return the results section.

    Surfaces are in LPS mm and tagged so that Slicer places them on the scan (module docstring).

    Parameters
    ----------
    labels : Volume
        3D label map with :data:`~KneeSegLogic.tissues.TISSUES` label values.
    out_dir : str or Path
        The output folder; files go to ``out_dir/surfaces/``.
    smoothing : {"windowed-sinc", "laplacian-idw", "none"}
    decimate : float
        Fraction of triangles to remove (0 keeps all).
    tissues : sequence of Tissue
        Structures to build; those absent from the label map are listed under ``absent``.
    progress : callable, optional
        ``progress(stage, fraction, message)``, e.g. an :class:`~KneeSegLogic.outputs.Progress`.
    resolution_mm : float
        Mesh resolution (:data:`MESH_RESOLUTION_MM` by default; 0: one face per voxel face).
    formats : sequence of str
        File types written, from :data:`SURFACE_FORMATS`.

    Returns
    -------
    dict
        ``{"coordinate_system": "LPS", "units": "mm", "smoothing": ..., "decimate": ...,
        "resolution_mm": ..., "voxels_per_block": [k, j, i],
        "structures": {key: {label, name, files, mesh check, seconds}}, "absent": [keys]}``;
        file paths are relative to ``out_dir``.

    Raises
    ------
    KneeSegError
        Not a 3D label map, unknown smoothing or file type, or a decimation fraction outside [0, 1).
    """
    if labels.array.ndim != 3:
        raise KneeSegError(f"surfaces need a 3D label map, got an array of shape {labels.array.shape}")
    if smoothing not in SMOOTHING_METHODS:
        raise KneeSegError(f"unknown smoothing {smoothing!r}; choose one of {', '.join(SMOOTHING_METHODS)}")
    if not 0.0 <= decimate < 1.0:
        raise KneeSegError(f"decimation fraction must be in [0, 1), got {decimate}")
    unknown = sorted(set(formats) - set(SURFACE_FORMATS))
    if unknown or not formats:
        found = f"unknown surface file type {unknown[0]!r}" if unknown else "no surface file type given"
        raise KneeSegError(f"{found}; choose from {', '.join(SURFACE_FORMATS)}")
    if not 0.0 <= resolution_mm <= 5.0:
        raise KneeSegError(f"mesh resolution must be 0 (the voxels) to 5 mm, got {resolution_mm}")
    folder = Path(out_dir) / SURFACES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # One pass finds every structure's bounding box (None for label values not present).
    boxes = ndimage.find_objects(labels.array) if np.issubdtype(labels.array.dtype, np.integer) else []
    present = {value + 1 for value, box in enumerate(boxes) if box is not None}
    section: dict[str, Any] = {
        "coordinate_system": COORDINATE_SYSTEM,
        "units": "mm",
        "smoothing": smoothing,
        "decimate": decimate,
        "resolution_mm": resolution_mm,
        "voxels_per_block": list(block_factors(labels.spacing_kji, resolution_mm)),
        "structures": {},
        "absent": [t.key for t in tissues if t.label not in present],
    }
    wanted = [t for t in tissues if t.label in present]

    def surface(structure: Tissue) -> tuple[vtkPolyData, dict[str, Any], float]:
        started = time.perf_counter()
        mesh, check = structure_surface(
            labels, structure.label, smoothing, decimate, boxes[structure.label - 1], resolution_mm
        )
        return mesh, check, time.perf_counter() - started

    # Structures are meshed in parallel threads (VTK's filters and numpy release the GIL: 2 cores
    # halve the stage) and written here, in order, as each is done: the writer toggles VTK's
    # global warning display, which threads must not share.
    with ThreadPoolExecutor(max_workers=max(1, min(cpu_cores(), len(wanted)))) as pool:
        for number, (structure, (mesh, check, seconds)) in enumerate(zip(wanted, pool.map(surface, wanted))):
            section["structures"][structure.key] = _written(mesh, check, seconds, structure, folder, formats)
            if progress is not None:
                progress("surfaces", (number + 1) / len(wanted), structure.name)
    if progress is not None:
        progress("surfaces", 1.0, f"{len(wanted)} surfaces")
    return section


def _written(
    mesh: vtkPolyData, check: dict[str, Any], seconds: float, structure: Tissue, folder: Path, formats: Sequence[str]
) -> dict[str, Any]:
    """Write one structure's mesh in ``formats`` into ``folder``; its entry of the results section."""
    started = time.perf_counter()
    files = {}
    for suffix, write in (("stl", write_stl), ("vtp", write_vtp)):
        if suffix not in formats:
            continue
        write(mesh, folder / f"{structure.key}.{suffix}")
        files[suffix] = f"{SURFACES_FOLDER}/{structure.key}.{suffix}"
    return {
        "label": structure.label,
        "name": structure.name,
        "files": files,
        **check,
        "seconds": round(seconds + time.perf_counter() - started, 4),
    }


@dataclass(frozen=True)
class SurfaceOptions:
    """How ``kneeseg surfaces`` builds its models: smoothing method (:data:`SMOOTHING_METHODS`),
    fraction of triangles removed by decimation (0 to <1), structures as comma-separated keys or
    label values (None: all present), mesh resolution in mm (:func:`block_factors`)."""

    smoothing: str = "windowed-sinc"
    decimate: float = 0.0
    structures: str | None = None
    overwrite: bool = False
    resolution_mm: float = MESH_RESOLUTION_MM


def _structures(text: str | None) -> tuple[Tissue, ...]:
    """``"femur,tibia"`` or ``"5,6"`` -> tissues (all when None)."""
    if not text:
        return TISSUES
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(tissue(int(item) if item.isdigit() else item) for item in items)
    except KeyError as error:
        raise KneeSegError(f"--structures: {error.args[0]}") from None


def surfaces_from_segmentation(
    segmentation: str | Path, out: str | Path, options: SurfaceOptions, progress: Progress | None = None
) -> Results:
    """Surface models of a segmentation file and their mesh check, into the output folder ``out``.

    Writes ``OUT/surfaces/<key>.stl|.vtp`` and ``OUT/results.json`` (section ``surfaces`` as
    :func:`build_surfaces` returns it, ``volumes_mm3`` per structure from the voxels, a warning
    per surface that is not closed and manifold, and per requested structure that is absent).

    Raises
    ------
    KneeSegError
        Unreadable segmentation, unknown structure, bad options, or none of the requested
        structures present; the output folder is then not created.
    """
    from KneeSegLogic.io.segfile import read_labels

    progress = progress or Progress()
    results = Results("surfaces")
    tissues = _structures(options.structures)
    with results.stage("read", progress):
        labels = read_labels(segmentation)
    results.add_input("segmentation", segmentation)
    with output_folder(out, results, overwrite=options.overwrite) as folder:
        with results.stage("surfaces", progress):
            section = build_surfaces(
                labels,
                folder,
                smoothing=options.smoothing,
                decimate=options.decimate,
                resolution_mm=options.resolution_mm,
                tissues=tissues,
                progress=progress,
            )
        if not section["structures"]:
            raise KneeSegError(f"{segmentation}: none of the requested structures is in the segmentation")
        if options.structures:
            for key in section["absent"]:
                results.warn(f"structure {key} requested but not in the segmentation")
        for key, entry in section["structures"].items():
            if not (entry["closed"] and entry["manifold"]):
                results.warn(
                    f"surface {key}: {entry['boundary_edges']} boundary and "
                    f"{entry['non_manifold_edges']} non-manifold edges"
                )
        results["surfaces"] = section
        results["volumes_mm3"] = {key: entry["voxel_volume_mm3"] for key, entry in section["structures"].items()}
    return results
