"""``kneeseg t2-change`` on a synthetic pair with a known rigid motion and a known T2 increase."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from KneeSegLogic.commands.main import main
from KneeSegLogic.errors import InputError
from KneeSegLogic.io.outputs import Results
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.longitudinal import (
    focal_change,
    read_time_point,
    t2_change_folders,
)
from KneeSegLogic.quantification.projection import ProjectionGrid
from KneeSegLogic.quantification.regions import divide_cartilage, femoral_cells

REPO = Path(__file__).resolve().parents[2]
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "knee_labels.nrrd"

T2_MS = {1: 40.0, 2: 33.0, 3: 35.0, 4: 42.0, 5: 60.0, 6: 60.0, 7: 60.0, 8: 60.0, 9: 15.0, 10: 14.0}
INCREASE_MS = 20.0
NOISE_MS = 2.0
# The patch: projection rows (slices, lateral first) and 5-degree columns on the medial condyle,
# central to posterior (columns 38-44 are 10 to 45 degrees posterior of inferior).
PATCH_ROWS = (46, 56)
PATCH_COLUMNS = (38, 45)


def half_resolution_knee() -> Volume:
    """The real label map at half resolution (every second voxel, same physical positions),
    cropped to the joint: fast enough for a test, real anatomy."""
    full = read_volume(SAMPLE_LABELS)
    array = full.array[20:160:2, 0:300:2, 60:310:2]
    origin = np.asarray(full.origin) + full.direction @ (np.asarray(full.spacing) * np.array([60, 0, 20]))
    return Volume(array.copy(), tuple(2 * s for s in full.spacing), tuple(origin), full.direction)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Baseline and follow-up output folders, the true motion and the true patch."""
    knee = half_resolution_knee()
    lookup = np.zeros(256, np.float32)
    lookup[list(T2_MS)] = list(T2_MS.values())
    t2 = lookup[knee.array]
    division = divide_cartilage(knee)
    grid, rows, columns = femoral_cells(knee, division)
    in_patch = (
        (rows >= PATCH_ROWS[0]) & (rows < PATCH_ROWS[1]) & (columns >= PATCH_COLUMNS[0]) & (columns < PATCH_COLUMNS[1])
    )
    plate = division.plates[1]
    followup_t2 = t2.copy()
    followup_t2[tuple(axis[in_patch] for axis in plate.index)] += INCREASE_MS

    # Follow-up scan = the knee moved: F(p) = B(motion(p)), sampled on the same grid.
    centre = np.asarray(knee.origin) + knee.direction @ (np.asarray(knee.spacing) * np.array([62, 75, 35]))
    motion = sitk.Euler3DTransform(tuple(centre), np.radians(3), np.radians(-2), np.radians(4), (2.5, -3.0, 1.5))

    def moved(array: np.ndarray) -> np.ndarray:
        image = knee.with_array(array).to_sitk()
        return sitk.GetArrayFromImage(
            sitk.Resample(image, image, motion, sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
        )

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("t2_change")
    scans = {
        "baseline": (knee.array, t2),
        "followup": (moved(knee.array), moved(followup_t2)),
    }
    for name, (labels, t2_map) in scans.items():
        (root / name).mkdir()
        noisy = t2_map + rng.normal(0, NOISE_MS, t2_map.shape).astype(np.float32)
        write_volume(knee.with_array(noisy.astype(np.float32)), root / name / "t2.nrrd")
        write_volume(knee.with_array(labels.astype(np.uint8)), root / name / "labels.nrrd")
    t2_change_folders(root / "baseline", root / "followup", root / "out")
    results = json.loads((root / "out" / "results.json").read_text())
    return {
        "root": root,
        "knee": knee,
        "results": results["t2_change"],
        "motion": motion,
        "grid": grid,
        "division": division,
        "in_patch": in_patch,
        "rows": rows,
        "columns": columns,
    }


def test_the_patch_is_found_where_it_is_and_as_large_as_it_is(pair):
    grid: ProjectionGrid = pair["grid"]
    covered = np.zeros(grid.shape, bool)
    covered[pair["rows"], pair["columns"]] = True
    assert covered[
        PATCH_ROWS[0] : PATCH_ROWS[1], PATCH_COLUMNS[0] : PATCH_COLUMNS[1]
    ].all()  # a full rectangle of cartilage
    rows_mm = (PATCH_ROWS[1] - PATCH_ROWS[0]) * grid.row_spacing_mm
    arc_mm = (PATCH_COLUMNS[1] - PATCH_COLUMNS[0]) * grid.column_width_mm
    centre_lr = np.mean(PATCH_ROWS) * grid.row_spacing_mm
    centre_arc = np.mean(PATCH_COLUMNS) * grid.column_width_mm

    clusters = pair["results"]["clusters"]
    assert len(clusters) == 1
    cluster = clusters[0]
    assert abs(cluster["area_mm2"] - rows_mm * arc_mm) < 0.2 * rows_mm * arc_mm
    assert abs(cluster["centroid_lr_mm"] - centre_lr) < 2.0
    assert abs(cluster["centroid_arc_mm"] - centre_arc) < 2.0
    assert abs(cluster["centroid_angle_deg"] - (np.mean(PATCH_COLUMNS) * 5 - 180)) < 4.0
    assert abs(cluster["mean_change_ms"] - INCREASE_MS) < 0.25 * INCREASE_MS  # positive: follow-up minus baseline
    plate = pair["results"]["plate_area_mm2"]
    assert pair["results"]["lesion_percent"] == pytest.approx(100 * cluster["area_mm2"] / plate)


def test_region_changes_have_the_right_sign_and_size(pair):
    plate = pair["division"].plates[1]
    changes = {row["label_value"]: row["t2_mean_change_ms"] for row in pair["results"]["regions"]}
    raised = 0
    for value in range(101, 113):
        in_region = plate.region == value
        expected = INCREASE_MS * pair["in_patch"][in_region].mean()
        if expected > 0:
            raised += 1
            assert abs(changes[value] - expected) < 0.2 * expected + 0.3, value
        else:
            assert abs(changes[value]) < 0.4, value
    assert raised >= 2
    for value in range(201, 207):  # tibial cartilage did not change
        assert abs(changes[value]) < 0.5


def test_t2_change_takes_a_region_file(pair, tmp_path):
    """A user label map replaces the built-in regions: the patch as region 7, the rest of the
    femoral cartilage as region 3; their changes are the known +20 ms and 0 ms."""
    knee, plate = pair["knee"], pair["division"].plates[1]
    regions = np.zeros(knee.array.shape, np.uint8)
    regions[plate.index] = np.where(pair["in_patch"], 7, 3)
    region_file = write_volume(knee.with_array(regions), tmp_path / "my_regions.nrrd")
    root, out = pair["root"], tmp_path / "out"
    code = main(
        ["t2-change", str(root / "baseline"), str(root / "followup"), "-o", str(out), "--regions", str(region_file)]
    )
    assert code == 0
    section = json.loads((out / "results.json").read_text())["t2_change"]
    assert section["user_regions"] is True
    changes = {row["label_value"]: row["t2_mean_change_ms"] for row in section["regions"]}
    assert sorted(changes) == [3, 7]
    assert abs(changes[7] - INCREASE_MS) < 0.2 * INCREASE_MS
    assert abs(changes[3]) < 0.5
    assert np.array_equal(read_volume(out / "regions.nrrd").array, regions)
    assert len((out / "t2_change.csv").read_text().splitlines()) == 1 + 2


def test_registration_recovers_the_motion(pair):
    transform = sitk.ReadTransform(str(pair["root"] / "out" / "followup_to_baseline.tfm"))
    truth = pair["motion"].GetInverse()  # a baseline point sits at motion^-1(point) in the follow-up
    knee = pair["knee"]
    k, j, i = np.nonzero(knee.array == 1)
    points = np.asarray(knee.origin) + (np.stack([i, j, k], 1)[::50] * np.asarray(knee.spacing)) @ knee.direction.T
    error = [
        np.linalg.norm(np.subtract(transform.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p)))) for p in points
    ]
    assert max(error) < 0.5  # mm, at 0.73 x 0.73 x 1.4 mm voxels
    assert pair["results"]["registration"]["femoral_cartilage_dice_after"] > 0.95


def test_outputs_overlay_the_baseline(pair):
    out = pair["root"] / "out"
    knee = pair["knee"]
    for name in ("regions.nrrd", "followup_t2_registered.nrrd", "followup_labels_registered.nrrd"):
        assert read_volume(out / name).same_grid(knee), name
    for name in (
        "t2_change.csv",
        "projection_t2_difference.png",
        "projection_t2_difference.nrrd",
        "projection_t2_baseline.nrrd",
        "projection_t2_followup.nrrd",
        "clusters.nrrd",
    ):
        assert (out / name).is_file(), name
    lines = (out / "t2_change.csv").read_text().splitlines()
    assert len(lines) == 1 + 22


def test_focal_change_is_one_sided_and_drops_small_clusters():
    grid = ProjectionGrid(n_rows=60, row_spacing_mm=1.0, radius_mm=1.0 / np.radians(5.0))  # columns exactly 1 mm
    counts = np.zeros(grid.shape)
    counts[5:55, 6:66] = 4
    baseline = np.where(counts > 0, 40.0, 0.0)
    followup = baseline.copy()
    followup[20:30, 20:32] += 12.0  # 120 mm^2 increase: a cluster
    followup[40:50, 40:52] -= 12.0  # a decrease: not a lesion in a one-sided search
    followup[10:12, 50:52] += 12.0  # 4 mm^2 increase: below 1 % of the plate
    result = focal_change(grid, (baseline, counts), (followup, counts))
    assert [c.area_mm2 for c in result.clusters] == [120.0]
    assert result.clusters[0].mean_change_ms == pytest.approx(12.0)
    assert result.clusters[0].centroid_lr_mm == pytest.approx(25.0)
    assert result.clusters[0].centroid_arc_mm == pytest.approx(26.0)
    plate = (50 - 8) * (60 - 8)  # eroded by 4 pixels on each side
    assert result.plate.sum() == plate
    assert result.lesion_percent == pytest.approx(100 * 120 / plate)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="t2.nrrd"):
        read_time_point(tmp_path / "empty")
    knee = Volume(np.zeros((4, 5, 6), np.float32) + 30.0, (1.0, 1.0, 1.0))
    (tmp_path / "t2only").mkdir()
    write_volume(knee, tmp_path / "t2only" / "t2.nrrd")
    with pytest.raises(InputError, match="segmentation"):
        read_time_point(tmp_path / "t2only")
    # A `kneeseg t2 --mask` folder: the mask is found through results.json while it is unchanged.
    labels = tmp_path / "mask.nrrd"
    write_volume(knee.with_array(np.ones((4, 5, 6), np.uint8)), labels)
    results = Results("t2")
    results.add_input("mask", labels)
    (tmp_path / "t2only" / "results.json").write_text(json.dumps(results.data))
    assert read_time_point(tmp_path / "t2only").labels.array.sum() == 4 * 5 * 6
    write_volume(knee.with_array(np.full((4, 5, 6), 2, np.uint8)), labels)
    with pytest.raises(InputError, match="no unchanged --mask"):
        read_time_point(tmp_path / "t2only")
    code = main(["t2-change", str(tmp_path / "t2only"), str(tmp_path / "empty"), "-o", str(tmp_path / "out")])
    assert code == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
