"""Surfaces: sphere volume, closed/manifold meshes, IDW shrinkage, oblique LPS placement, files, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_DATA, rotation
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkIOGeometry import vtkSTLReader
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from KneeSegLogic.commands.main import build_parser, main
from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.surfaces import (
    SMOOTHING_METHODS,
    STL_FACET,
    block_factors,
    block_means,
    build_surfaces,
    extract_surface,
    mesh_check,
    signed_volume,
    structure_surface,
)
from KneeSegLogic.tissues import TISSUES, tissue

SPHERE_RADIUS_MM = 8.0
SPHERE_SPACING = (0.5, 0.45, 0.8)  # i, j, k
SPHERE_CENTRE_INDEX = np.array([20.3, 22.1, 13.2])  # i, j, k: off the voxel lattice


@pytest.fixture(scope="module")
def sphere() -> Volume:
    """A ball of radius 8 mm on an anisotropic, oblique grid (label 7)."""
    size = (41, 45, 27)  # i, j, k
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    offset = np.stack([i, j, k], axis=-1) - SPHERE_CENTRE_INDEX
    distance = np.linalg.norm(offset * np.asarray(SPHERE_SPACING), axis=-1)
    array = np.where(distance <= SPHERE_RADIUS_MM, 7, 0).astype(np.uint8)
    return Volume(array, SPHERE_SPACING, (3.0, -40.0, 12.5), rotation((1.0, 2.0, 0.5), 35.0))


def sphere_centre_lps(sphere: Volume) -> np.ndarray:
    return (sphere.index_to_physical() @ np.append(SPHERE_CENTRE_INDEX, 1.0))[:3]


def mesh_points(mesh) -> np.ndarray:
    return vtk_to_numpy(mesh.GetPoints().GetData()).astype(float)


def enclosed_centroid(mesh) -> np.ndarray:
    """Centroid of the solid a closed, outward-oriented mesh encloses (signed tetrahedra)."""
    points = mesh_points(mesh)
    triangles = vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    a, b, c = (points[triangles[:, n]] for n in range(3))
    volumes = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0
    return (volumes[:, None] * (a + b + c) / 4.0).sum(axis=0) / volumes.sum()


def test_sphere_volume_within_one_percent_after_default_smoothing(sphere: Volume) -> None:
    analytic = 4.0 / 3.0 * np.pi * SPHERE_RADIUS_MM**3
    mesh, check = structure_surface(sphere, 7)
    assert check["closed"] and check["manifold"]
    assert abs(check["mesh_volume_mm3"] / analytic - 1.0) < 0.01
    raw, _ = structure_surface(sphere, 7, smoothing="none")
    centre = sphere_centre_lps(sphere)
    smoothed_error = np.linalg.norm(mesh_points(mesh) - centre, axis=1) - SPHERE_RADIUS_MM
    raw_error = np.linalg.norm(mesh_points(raw) - centre, axis=1) - SPHERE_RADIUS_MM
    # smoothing brings the staircase towards the true sphere, without moving it on average
    assert np.sqrt(np.mean(smoothed_error**2)) < 0.6 * np.sqrt(np.mean(raw_error**2))
    assert abs(smoothed_error.mean()) < 0.05


def test_fine_sphere_meshed_in_blocks_keeps_volume_and_position() -> None:
    """An 8 mm ball (a patella's curvature) on a 0.2 mm grid: at 0.5 mm resolution (3-voxel blocks)
    the mesh has a fraction of the triangles and the volume, centre and radius of the ball.
    (Measured on a 5 mm ball: -1.1 % volume before smoothing, the chords of 0.6 mm triangles.)"""
    radius, spacing, size = 8.0, 0.2, 96
    centre_index = np.array([47.4, 46.2, 48.7])  # i, j, k
    k, j, i = np.meshgrid(*[np.arange(size, dtype=float)] * 3, indexing="ij")
    distance = np.linalg.norm((np.stack([i, j, k], axis=-1) - centre_index) * spacing, axis=-1)
    ball = Volume(np.where(distance <= radius, 7, 0).astype(np.uint8), (spacing,) * 3, (1.0, 2.0, 3.0), np.eye(3))
    centre = (ball.index_to_physical() @ np.append(centre_index, 1.0))[:3]
    analytic = 4.0 / 3.0 * np.pi * radius**3
    native, native_check = structure_surface(ball, 7, resolution_mm=0.0)
    blocks, check = structure_surface(ball, 7, resolution_mm=0.5)
    assert check["closed"] and check["manifold"]
    assert check["triangles"] < native_check["triangles"] / 5
    for mesh_check_ in (native_check, check):
        assert abs(mesh_check_["mesh_volume_mm3"] / analytic - 1.0) < 0.01
    radial = np.linalg.norm(mesh_points(blocks) - centre, axis=1) - radius
    assert abs(radial.mean()) < 0.05 and np.abs(radial).max() < 0.25
    assert np.linalg.norm(enclosed_centroid(blocks) - centre) < 0.02


def test_idw_laplacian_shrinks_more_than_windowed_sinc(sphere: Volume) -> None:
    _, sinc = structure_surface(sphere, 7, smoothing="windowed-sinc")
    _, idw = structure_surface(sphere, 7, smoothing="laplacian-idw")
    _, none = structure_surface(sphere, 7, smoothing="none")
    print(
        f"\nsphere volume change by smoothing: windowed-sinc {sinc['smoothing_volume_change']:+.4f}, "
        f"laplacian-idw {idw['smoothing_volume_change']:+.4f}"
    )
    assert none["smoothing_volume_change"] == 0.0
    assert idw["closed"] and idw["manifold"]
    assert idw["smoothing_volume_change"] < -0.02
    assert abs(sinc["smoothing_volume_change"]) < 0.005
    assert abs(idw["smoothing_volume_change"]) > 5 * abs(sinc["smoothing_volume_change"])


def test_oblique_left_handed_grid_lands_at_the_voxels_lps_positions(oblique_labels: Volume) -> None:
    assert np.linalg.det(oblique_labels.direction) < 0
    image = sitk.GetImageFromArray(oblique_labels.array)
    image.SetSpacing(oblique_labels.spacing)
    image.SetOrigin(oblique_labels.origin)
    image.SetDirection(tuple(oblique_labels.direction.ravel()))
    mask = oblique_labels.array == 5
    points, triangles = extract_surface(mask, oblique_labels.index_to_physical())
    # Unsmoothed points sit half-way between a voxel of the structure and one outside it:
    # map them back to continuous indices with SimpleITK (an independent geometry code path).
    index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
    half = np.abs(index - np.round(index)) > 0.25
    assert np.all(half.sum(axis=1) == 1)
    assert np.allclose(index[~half], np.round(index[~half]), atol=1e-6)
    assert np.allclose(index[half] % 1.0, 0.5, atol=1e-6)
    low = np.floor(index + 1e-9 * ~half).astype(int)
    high = low + half.astype(int)
    inside_low = mask[low[:, 2], low[:, 1], low[:, 0]]
    inside_high = mask[high[:, 2], high[:, 1], high[:, 0]]
    assert np.all(inside_low != inside_high)
    # normals outwards despite the left-handed grid
    assert signed_volume(points, triangles) > 0
    # smoothed surface: the centroid of what it encloses is the voxel centres' centroid, in LPS mm
    mesh, check = structure_surface(oblique_labels, 5)
    centres = np.array([image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for k, j, i in np.argwhere(mask)])
    error = np.linalg.norm(enclosed_centroid(mesh) - centres.mean(axis=0))
    print(f"\ncentroid of the smoothed oblique surface vs voxel centres: {error:.4f} mm")
    assert error < 0.05
    assert 0.9 < check["volume_ratio"] < 1.05


def test_mesh_check_finds_holes_and_non_manifold_edges() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    points, triangles = extract_surface(mask, np.eye(4))
    assert mesh_check(points, triangles) == {
        "closed": True,
        "manifold": True,
        "boundary_edges": 0,
        "non_manifold_edges": 0,
    }
    opened = mesh_check(points, triangles[1:])
    assert not opened["closed"] and opened["boundary_edges"] == 3
    fin = np.vstack([triangles, [[triangles[0, 0], triangles[0, 1], len(points)]]])
    finned = mesh_check(np.vstack([points, [[9.0, 9.0, 9.0]]]), fin)
    assert not finned["manifold"] and finned["non_manifold_edges"] == 1


def test_files_carry_lps_tag_and_millimetres(sphere: Volume, tmp_path) -> None:
    section = build_surfaces(sphere, tmp_path)
    entry = section["structures"]["patella"]
    assert section["coordinate_system"] == "LPS" and section["units"] == "mm"
    assert len(section["absent"]) == len(TISSUES) - 1
    stl_path = tmp_path / entry["files"]["stl"]
    assert b"SPACE=LPS" in stl_path.read_bytes()[:80]
    reader = vtkSTLReader()
    reader.SetFileName(str(stl_path))
    reader.Update()
    assert "SPACE=LPS" in reader.GetHeader()
    stl_points = mesh_points(reader.GetOutput())
    vtp = vtkXMLPolyDataReader()
    vtp.SetFileName(str(tmp_path / entry["files"]["vtp"]))
    vtp.Update()
    polydata = vtp.GetOutput()
    assert polydata.GetFieldData().GetAbstractArray("SPACE").GetValue(0) == "LPS"
    assert polydata.GetPointData().GetNormals() is not None
    assert polydata.GetNumberOfPolys() == reader.GetOutput().GetNumberOfPolys() == entry["triangles"]
    centre = sphere_centre_lps(sphere)
    for points in (stl_points, mesh_points(polydata)):
        assert abs(np.linalg.norm(points - centre, axis=1).mean() - SPHERE_RADIUS_MM) < 0.1
    # Binary STL layout: 80-byte header, facet count, 50-byte facets whose unit normals point outwards.
    raw = stl_path.read_bytes()
    facets = np.frombuffer(raw, STL_FACET, offset=84)
    assert int(np.frombuffer(raw, "<u4", 1, 80)[0]) == len(facets) == entry["triangles"]
    assert len(raw) == 84 + 50 * len(facets)
    np.testing.assert_allclose(np.linalg.norm(facets["normal"], axis=1), 1.0, atol=1e-5)
    outward = np.einsum("ij,ij->i", facets["normal"], facets["vertices"].mean(axis=1) - centre)
    assert np.all(outward > 0)


def test_real_label_map_gives_closed_surfaces_for_every_structure(tmp_path) -> None:
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    wall, cpu = time.perf_counter(), time.process_time()
    section = build_surfaces(labels, tmp_path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\nall {len(section['structures'])} surfaces: {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert sorted(section["structures"]) == sorted(t.key for t in TISSUES)
    for key, entry in section["structures"].items():
        print(
            f"  {key:26s} {entry['triangles']:7d} triangles  volume ratio {entry['volume_ratio']:.4f}  {entry['seconds']:.3f} s"
        )
        assert entry["closed"] and entry["manifold"], key
        voxels = np.count_nonzero(labels.array == tissue(key).label) * labels.voxel_volume_mm3
        assert entry["voxel_volume_mm3"] == pytest.approx(voxels, rel=1e-6)
        assert 0.95 < entry["volume_ratio"] < 1.02, key
        assert (tmp_path / entry["files"]["stl"]).stat().st_size > 1000


def test_idw_shrinks_a_real_meniscus_more_than_windowed_sinc() -> None:
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    _, sinc = structure_surface(labels, 10, smoothing="windowed-sinc")
    _, idw = structure_surface(labels, 10, smoothing="laplacian-idw")
    print(
        f"\nmedial meniscus volume change: windowed-sinc {sinc['smoothing_volume_change']:+.4f}, "
        f"laplacian-idw {idw['smoothing_volume_change']:+.4f}"
    )
    assert idw["smoothing_volume_change"] < 3 * sinc["smoothing_volume_change"] < 0


def test_decimation_reduces_triangles(sphere: Volume) -> None:
    _, full = structure_surface(sphere, 7)
    _, half = structure_surface(sphere, 7, decimate_fraction=0.5)
    assert half["triangles"] == pytest.approx(full["triangles"] / 2, rel=0.05)
    assert half["closed"] and half["manifold"]
    assert abs(half["volume_ratio"] - full["volume_ratio"]) < 0.01


def test_surfaces_command(tmp_path) -> None:
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    small = Volume(
        np.ascontiguousarray(labels.array[::2, ::2, ::2]),
        tuple(2 * s for s in labels.spacing),
        labels.origin,
        labels.direction,
    )
    source = write_volume(small, tmp_path / "labels.nrrd")
    out = tmp_path / "out"
    assert (
        main(["surfaces", str(source), "-o", str(out), "--structures", "patella,6", "--smoothing", "laplacian-idw"])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["surfaces"]["structures"]) == ["patella", "tibia"]
    assert results["surfaces"]["smoothing"] == "laplacian-idw"
    assert results["volumes_mm3"]["patella"] == pytest.approx(
        np.count_nonzero(small.array == 7) * small.voxel_volume_mm3
    )
    assert (out / "surfaces" / "tibia.vtp").exists() and (out / "surfaces" / "patella.stl").exists()
    assert "surfaces" in results["timings_s"] and results["inputs"][0]["sha256"]
    assert main(["surfaces", str(source), "-o", str(out)]) == 1  # exists, no --overwrite
    assert main(["surfaces", str(source), "-o", str(tmp_path / "x"), "--structures", "kneecap"]) == 1
    assert main(["surfaces", str(source), "-o", str(tmp_path / "y"), "--decimate", "1.5"]) == 1
    assert main(["surfaces", str(tmp_path / "missing.nrrd"), "-o", str(tmp_path / "z")]) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.partial").exists()


def test_cli_choices_match_the_engine() -> None:
    parser = build_parser()
    surfaces = parser._subparsers._group_actions[0].choices["surfaces"]
    smoothing = next(a for a in surfaces._actions if a.dest == "smoothing")
    assert tuple(smoothing.choices) == SMOOTHING_METHODS


def test_build_surfaces_rejects_bad_options(sphere: Volume, tmp_path) -> None:
    with pytest.raises(KneeSegError):
        build_surfaces(sphere, tmp_path, smoothing="taubin")
    with pytest.raises(KneeSegError):
        build_surfaces(sphere, tmp_path, decimate=1.0)


def test_build_surfaces_writes_only_the_file_types_asked_for_and_refuses_others(tmp_path) -> None:
    array = np.zeros((12, 14, 16), np.uint8)
    array[3:9, 4:10, 5:12] = tissue("femur").label
    labels = Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    section = build_surfaces(labels, tmp_path, formats=("vtp",))
    assert section["structures"]["femur"]["files"] == {"vtp": "surfaces/femur.vtp"}
    assert [p.name for p in (tmp_path / "surfaces").iterdir()] == ["femur.vtp"]
    with pytest.raises(KneeSegError, match="unknown surface file type 'obj'"):
        build_surfaces(labels, tmp_path / "other", formats=("obj", "vtp"))
    with pytest.raises(KneeSegError, match="no surface file type given"):
        build_surfaces(labels, tmp_path / "other", formats=())


def test_block_factors_merge_only_axes_finer_than_the_resolution() -> None:
    assert block_factors((0.3916, 0.2734, 0.2734), 0.5) == (1, 2, 2)  # the 512 x 512 x 286 knee
    assert block_factors((0.7, 0.36, 0.36), 0.5) == (1, 1, 1)  # the bundled label map
    assert block_factors((0.2, 0.2, 0.1), 0.5) == (3, 3, 5)
    assert block_factors((0.1, 0.1, 0.1), 0.0) == (1, 1, 1)


def test_block_means_average_whole_blocks_and_pad_the_last_with_background() -> None:
    mask = np.zeros((3, 4, 5), bool)
    mask[0, :2, :2] = True  # one full 1x2x2 block
    mask[2, 3, 4] = True  # alone in the padded corner block (1 of 4 voxels real)
    means = block_means(mask, (1, 2, 2))
    assert means.shape == (3, 2, 3) and means.dtype == np.float32
    assert means[0, 0, 0] == 1.0 and means[2, 1, 2] == 0.25
    assert means.sum() == 1.25
