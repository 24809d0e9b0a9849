"""Cartilage subregions, knee frame, thickness and projection maps on the real OAI-grid label map."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume, orientation_code, reorient
from KneeSegLogic.quantification.knee_frame import knee_frame, label_centroids
from KneeSegLogic.quantification.regions import (
    REGION_NAMES,
    analyse_cartilage,
    divide_cartilage,
    division_thickness,
    femoral_projection_maps,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "knee_labels.nrrd"
SHARED_LABELS = (
    REPO.parent / "shared" / "data" / "knee_labels_pymskt" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"
)

FEMORAL_REGIONS = set(range(101, 113))
MEDIAL_FEMORAL = set(range(101, 107))
LATERAL_FEMORAL = set(range(107, 113))


def crop(volume: Volume, lower: tuple[int, int, int], upper: tuple[int, int, int]) -> Volume:
    """Sub-volume array[k0:k1, j0:j1, i0:i1] with the origin moved so every voxel keeps its place."""
    (k0, j0, i0), (k1, j1, i1) = lower, upper
    origin = np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * np.array([i0, j0, k0]))
    return Volume(volume.array[k0:k1, j0:j1, i0:i1].copy(), volume.spacing, tuple(origin), volume.direction)


def mirror_left_right(volume: Volume) -> Volume:
    """The mirror image of the anatomy across the patient's sagittal plane x = 0 (a left knee
    from a right one): the array is flipped along its LR axis and the direction matrix changed
    to match, so the direction stays a proper rotation."""
    mirror = np.diag([-1.0, 1.0, 1.0])
    lr_itk_axis = int(np.argmax(np.abs(volume.direction[0])))
    flip = np.eye(3)
    flip[lr_itk_axis, lr_itk_axis] = -1.0
    last = np.zeros(3)
    last[lr_itk_axis] = volume.size[lr_itk_axis] - 1
    origin = mirror @ (np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * last))
    array = np.flip(volume.array, axis=2 - lr_itk_axis).copy()
    return Volume(array, volume.spacing, tuple(origin), mirror @ volume.direction @ flip)


@pytest.fixture(scope="module")
def knee() -> Volume:
    """The bundled real label map (a right knee), cropped to the joint (fibula head included)."""
    return crop(read_volume(SAMPLE_LABELS), (20, 55, 60), (160, 300, 310))


@pytest.fixture(scope="module")
def division(knee):
    return divide_cartilage(knee)


def medial_is_on_label2_side(regions: Volume, anatomy: Volume) -> bool:
    """Medial femoral regions lie on the side of the medial tibial cartilage (label 2) of ``anatomy``."""
    frame_left = knee_frame(anatomy, knee_side="right").left  # only the LR axis is used
    region_centres = label_centroids(regions)
    medial = np.mean([region_centres[v] for v in MEDIAL_FEMORAL], axis=0)
    lateral = np.mean([region_centres[v] for v in LATERAL_FEMORAL], axis=0)
    anatomy_centres = label_centroids(anatomy)
    return bool(((medial - lateral) @ frame_left) * ((anatomy_centres[2] - anatomy_centres[3]) @ frame_left) > 0)


def test_shared_copy_is_the_bundled_label_map():
    if not SHARED_LABELS.exists():
        pytest.skip("shared data folder absent")
    assert SHARED_LABELS.read_bytes() == SAMPLE_LABELS.read_bytes()


@pytest.mark.parametrize("variant", ["dosma", "thomas"])
def test_femoral_regions_partition_the_femoral_cartilage(knee, variant):
    regions = divide_cartilage(knee, variant).regions.array
    femoral = knee.array == 1
    values, counts = np.unique(regions[femoral], return_counts=True)
    assert set(values.tolist()) == FEMORAL_REGIONS  # every voxel in one of the 12, each non-empty
    assert counts.min() > 500
    assert not np.isin(regions[~femoral], list(FEMORAL_REGIONS)).any()


def test_central_arc_of_thomas_is_wider_than_dosma(knee):
    def central_voxels(variant):
        regions = divide_cartilage(knee, variant).regions.array
        return np.isin(regions, [103, 104, 109, 110]).sum()

    ratio = central_voxels("thomas") / central_voxels("dosma")
    assert 1.4 < ratio < 3.0  # 60 versus 30 degrees of arc


def test_deep_is_nearer_the_bone_than_superficial(knee, division):
    plate = division.plates[1]
    circle = division.geometry.circle
    rho = np.hypot(plate.coordinates[:, 1] - circle.inferior, plate.coordinates[:, 2] - circle.posterior)
    deep = plate.region % 2 == 1  # odd femoral values are deep
    assert rho[deep].mean() < rho[~deep].mean() - 0.5
    assert 0.4 < deep.mean() < 0.6


def test_knee_side_from_anatomy(knee, division):
    frame = division.geometry.frame
    assert frame.knee_side == "right"  # the file is a right knee (name and fibula agree)
    assert "tibial" in frame.side_evidence
    assert orientation_code(knee) == "PIR" and frame.lr_axis == 0
    assert medial_is_on_label2_side(division.regions, knee)


def test_left_knee_mirror_gives_mirrored_regions(knee, division):
    left_knee = mirror_left_right(knee)
    assert np.isclose(np.linalg.det(left_knee.direction), np.linalg.det(knee.direction))
    mirrored = divide_cartilage(left_knee)
    assert mirrored.geometry.frame.knee_side == "left"
    assert medial_is_on_label2_side(mirrored.regions, left_knee)
    # The same anatomy, mirrored: the same voxels get the same regions.
    back = np.flip(mirrored.regions.array, axis=0)
    cartilage = division.regions.array > 0
    assert np.mean(back[cartilage] == division.regions.array[cartilage]) > 0.999


def test_knee_side_without_side_labels_uses_fibula_then_coordinates(knee):
    for volume, side in ((knee, "right"), (mirror_left_right(knee), "left")):
        no_sides = volume.with_array(np.where(np.isin(volume.array, [2, 3, 9, 10]), 0, volume.array).astype(np.uint8))
        frame = knee_frame(no_sides)
        assert (frame.knee_side, frame.side_evidence.split()[0]) == (side, "fibula")
        assert medial_is_on_label2_side(divide_cartilage(no_sides).regions, volume)
        no_fibula = no_sides.with_array(np.where(no_sides.array == 8, 0, no_sides.array).astype(np.uint8))
        frame = knee_frame(no_fibula)
        assert (frame.knee_side, frame.side_evidence.split()[0]) == (side, "patient")


def test_regions_follow_the_anatomy_not_the_axis_order(knee, division):
    axial_order = reorient(knee, "LPS")
    assert axial_order.array.shape != knee.array.shape
    regions = divide_cartilage(axial_order).regions
    assert divide_cartilage(axial_order).geometry.frame.lr_axis == 2
    back = reorient(regions, orientation_code(knee))
    assert back.same_grid(division.regions)
    cartilage = division.regions.array > 0
    assert np.mean(back.array[cartilage] == division.regions.array[cartilage]) > 0.999


def test_tibial_and_patellar_regions(knee, division):
    regions = division.regions.array
    assert set(np.unique(regions[knee.array == 2])) == {201, 202, 203}
    assert set(np.unique(regions[knee.array == 3])) == {204, 205, 206}
    assert set(np.unique(regions[knee.array == 4])) == {301, 302, 303, 304}
    posterior = {
        value: division.plates[2].coordinates[division.plates[2].region == value, 2].mean() for value in (201, 202, 203)
    }
    assert posterior[201] < posterior[202] < posterior[203]  # anterior, central, posterior thirds
    patella = division.plates[4]
    deep = np.isin(patella.region, [301, 303])
    assert patella.coordinates[deep, 2].mean() < patella.coordinates[~deep, 2].mean()  # deep is anterior
    left = division.geometry.frame.left
    centres = label_centroids(division.regions)
    medial_patella = (centres[301] + centres[302]) / 2
    lateral_patella = (centres[303] + centres[304]) / 2
    medial_tibia = label_centroids(knee)[2]
    lateral_tibia = label_centroids(knee)[3]
    assert ((medial_patella - lateral_patella) @ left) * ((medial_tibia - lateral_tibia) @ left) > 0


def test_femoral_cartilage_thickness_is_physiological(knee, division):
    thickness = division_thickness(knee, division)
    assert 1.5 < thickness[1].mean_mm() < 3.0
    assert 1.0 < thickness[2].mean_mm() < 3.5


def _shell(bone: bool) -> tuple[Volume, float]:
    """A 200-degree cartilage shell (label 1) of known thickness around a cylinder along the LR
    image axis, on an anisotropic grid with an oblique direction matrix."""
    spacing = (0.3, 0.4, 0.7)  # i, j, k
    shape = (40, 160, 150)  # k, j, i
    inner, thickness = 20.0, 2.0
    k, j, i = np.indices(shape)
    y = (i - shape[2] / 2) * spacing[0]
    z = (j - shape[1] / 2) * spacing[1]
    radius = np.hypot(y, z)
    angle = np.degrees(np.arctan2(y, z))  # 0 toward +j
    array = np.zeros(shape, np.uint8)
    array[(radius >= inner) & (radius < inner + thickness) & (np.abs(angle) < 100) & (k > 2) & (k < shape[0] - 3)] = 1
    if bone:
        array[radius < inner] = 5
    # k runs patient left-right; j roughly inferior, i roughly posterior; then tilt it all.
    base = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    direction = Rotation.from_euler("xyz", [8, -6, 12], degrees=True).as_matrix() @ base
    return Volume(array, spacing, (-60.0, 10.0, 5.0), direction), thickness


@pytest.mark.parametrize("bone", [True, False])
def test_thickness_of_a_known_shell(bone):
    shell, truth = _shell(bone)
    division = divide_cartilage(shell, knee_side="right")
    assert abs(division.geometry.circle.radius - 21.0) < 0.5
    measured = division_thickness(shell, division)[1].mean_mm()
    assert abs(measured - truth) < 0.06 * truth


T2_TRUTH_MS = {1: 40.0, 2: 33.0, 3: 35.0, 4: 42.0, 5: 60.0, 6: 60.0, 7: 60.0, 8: 60.0, 9: 15.0, 10: 14.0}


def test_analyse_cartilage_writes_regions_table_and_maps(knee, tmp_path):
    lookup = np.zeros(256, np.float32)
    lookup[list(T2_TRUTH_MS)] = list(T2_TRUTH_MS.values())
    rng = np.random.default_rng(1)
    t2 = knee.with_array(lookup[knee.array] + rng.normal(0, 2.0, knee.array.shape).astype(np.float32))
    result = analyse_cartilage(knee, t2, tmp_path)
    for name in (
        "regions.nrrd",
        "regions.csv",
        "projection_t2.nrrd",
        "projection_t2.png",
        "projection_thickness.nrrd",
        "projection_thickness.png",
    ):
        assert (tmp_path / name).is_file(), name
    regions = read_volume(tmp_path / "regions.nrrd")
    assert regions.same_grid(knee)
    assert np.array_equal(regions.array > 0, np.isin(knee.array, [1, 2, 3, 4]))
    rows = {row["name"]: row for row in result["regions"]}
    assert set(rows) == set(REGION_NAMES.values())
    truth = {"femoral": 40.0, "tibial_medial": 33.0, "tibial_lateral": 35.0, "patellar": 42.0}
    for name, row in rows.items():
        expected = next(value for prefix, value in truth.items() if name.startswith(prefix))
        assert abs(row["t2_mean_ms"] - expected) < 0.3, name
        assert 1.6 < row["t2_sd_ms"] < 2.4
        assert row["volume_mm3"] == pytest.approx(row["voxels"] * knee.voxel_volume_mm3)
    assert sum(rows[REGION_NAMES[v]]["voxels"] for v in FEMORAL_REGIONS) == (knee.array == 1).sum()
    csv_lines = (tmp_path / "regions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 + len(REGION_NAMES)
    t2_map, header = nrrd.read(str(tmp_path / "projection_t2.nrrd"), index_order="C")
    assert t2_map.shape == (knee.array.shape[0], 72)
    assert header["units"] == ["deg", "mm"]
    assert abs(t2_map[t2_map > 0].mean() - 40.0) < 0.5
    thickness_map, _ = nrrd.read(str(tmp_path / "projection_thickness.nrrd"), index_order="C")
    assert np.array_equal(thickness_map > 0, t2_map > 0)
    assert result["geometry"]["knee_side"] == "right"


def test_projection_rows_run_lateral_to_medial_for_both_knees(knee):
    maps = {}
    for name, volume in (("right", knee), ("left", mirror_left_right(knee))):
        division = divide_cartilage(volume)
        _, projections = femoral_projection_maps(volume, division, division_thickness(volume, division), None)
        maps[name] = projections["thickness"][0]
    # Equal up to ties between equidistant surface points, which a mirror image breaks differently.
    assert np.array_equal(maps["right"] > 0, maps["left"] > 0)
    assert np.abs(maps["right"] - maps["left"]).mean() < 0.01
    # Lateral first: the lateral tibial plateau (label 3) lies under the upper rows of the map.
    rows = np.flatnonzero((maps["right"] > 0).any(axis=1))
    knee_rows = np.arange(knee.array.shape[0])  # k runs toward patient right = lateral here
    lateral_tibia_rows = knee_rows[(knee.array == 3).any(axis=(1, 2))]
    medial_tibia_rows = knee_rows[(knee.array == 2).any(axis=(1, 2))]
    assert lateral_tibia_rows.mean() > medial_tibia_rows.mean()
    map_row_of = knee.array.shape[0] - 1 - knee_rows  # so lateral slices must come first in the map
    assert map_row_of[lateral_tibia_rows].mean() < map_row_of[medial_tibia_rows].mean()
    assert rows.min() <= map_row_of[lateral_tibia_rows].mean() <= rows.max()


def test_user_regions_replace_the_built_in_division(knee, division, tmp_path):
    plate = division.plates[1]
    user = np.zeros(knee.array.shape, np.uint16)
    halves = np.where(plate.coordinates[:, 2] < np.median(plate.coordinates[:, 2]), 7, 9)
    user[plate.index] = halves
    result = analyse_cartilage(knee, None, tmp_path, user_regions=knee.with_array(user))
    assert result["user_regions"] is True
    assert {row["name"]: row["voxels"] for row in result["regions"]} == {
        "region_7": int((halves == 7).sum()),
        "region_9": int((halves == 9).sum()),
    }
    assert np.array_equal(read_volume(tmp_path / "regions.nrrd").array, user)
    assert all(1.0 < row["thickness_mean_mm"] < 3.0 for row in result["regions"])


def test_bad_inputs(knee, tmp_path):
    with pytest.raises(ValueError, match="variant"):
        divide_cartilage(knee, "nonsense")
    bones_only = knee.with_array(np.where(knee.array >= 5, knee.array, 0).astype(np.uint8))
    with pytest.raises(InputError, match="no cartilage"):
        analyse_cartilage(bones_only, None, tmp_path)
