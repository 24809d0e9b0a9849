"""Segmentation metrics against answers known in closed form, and the model rank score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from KneeSegLogic.commands import main as cli
from KneeSegLogic.errors import InputError
from KneeSegLogic.evaluation.metrics import (
    choose_model,
    evaluate,
    format_table,
    summarize,
    surface_distances,
    surface_voxels,
    to_json,
)
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], side: int, label: int = 1) -> np.ndarray:
    array = np.zeros(shape, np.uint8)
    array[tuple(slice(s, s + side) for s in start)] = label
    return array


def shifted_cube_distances(n: int, s: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distances from the boundary voxels of an n-cube to those of a copy shifted by s voxels.

    Worked out by hand for the 6-connected boundary-voxel surface. The shift runs along the
    first axis (spacing ``spacing[0]``); with z the index along it, y and x the others:
    - the face z = 0 (n^2 voxels) is s*dz from the shifted cube's face z = s;
    - side voxels (y or x on the cube's edge) at 0 < z < s are (s - z)*dz away, those at
      z >= s lie on the shifted cube's sides too (distance 0);
    - interior voxels of the face z = n-1 reach the shifted top face (s*dz), its bottom face
      ((n-1-s)*dz) or its side faces (min(y, n-1-y)*dy, min(x, n-1-x)*dx), whichever is nearest.
    The shifted cube's distances back are the same set by the mirror symmetry z -> s+n-1-z.
    """
    dz, dy, dx = spacing
    distances = [np.full(n * n, s * dz)]
    for z in range(1, n - 1):
        ring = 4 * (n - 1)
        distances.append(np.full(ring, (s - z) * dz if z < s else 0.0))
    distances.append(np.zeros(4 * (n - 1)))
    inner = np.arange(1, n - 1)
    to_side = np.minimum(inner, n - 1 - inner)
    top = np.minimum.reduce([
        np.full((n - 2, n - 2), s * dz), np.full((n - 2, n - 2), (n - 1 - s) * dz),
        to_side[:, None] * dy + 0 * inner[None, :], 0 * inner[:, None] + to_side[None, :] * dx,
    ])
    distances.append(top.ravel())
    return np.concatenate(distances)


# --- closed-form geometry ---------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_with_anisotropic_spacing(axis: int) -> None:
    n, s = 10, 3
    spacing_xyz = (0.5, 0.8, 2.0)  # i, j, k
    spacing_kji = spacing_xyz[::-1]
    shape = (18, 18, 18)
    start = [2, 2, 2]
    reference = cube(shape, tuple(start), n)
    start[axis] += s
    prediction = cube(shape, tuple(start), n)
    result = evaluate(Volume(prediction, spacing_xyz), Volume(reference, spacing_xyz))
    metrics = result["structures"]["femoral_cartilage"]

    assert metrics["dice"] == pytest.approx(1 - s / n)
    assert metrics["iou"] == pytest.approx((n - s) / (n + s))
    assert metrics["precision"] == pytest.approx((n - s) / n)
    assert metrics["recall"] == pytest.approx((n - s) / n)
    assert metrics["volume_difference_mm3"] == 0

    # Put the shift axis first for the hand-derived formula.
    others = [a for a in range(3) if a != axis]
    ordered = (spacing_kji[axis], spacing_kji[others[0]], spacing_kji[others[1]])
    one_way = shifted_cube_distances(n, s, ordered)
    pooled = np.concatenate([one_way, one_way])
    shift_mm = s * spacing_kji[axis]
    assert metrics["hd_mm"] == pytest.approx(shift_mm, rel=1e-6)
    assert metrics["hd95_mm"] == pytest.approx(shift_mm, rel=1e-6)  # a sixth of the surface is shift_mm away
    assert metrics["hd95_mm"] == pytest.approx(np.percentile(pooled, 95), rel=1e-6)
    assert metrics["assd_mm"] == pytest.approx(pooled.mean(), rel=1e-6)
    assert metrics["assd_mm"] < shift_mm  # shared side boundary voxels are at distance 0


def test_surface_distances_equal_brute_force_on_random_shapes() -> None:
    rng = np.random.default_rng(7)
    spacing = (2.5, 0.6, 0.9)
    from scipy import ndimage

    a = ndimage.binary_opening(rng.random((14, 16, 15)) > 0.45)
    b = ndimage.binary_opening(rng.random((14, 16, 15)) > 0.45)
    a_to_b, b_to_a = surface_distances(a, b, spacing)
    points_a = np.argwhere(surface_voxels(a)) * spacing
    points_b = np.argwhere(surface_voxels(b)) * spacing
    pairwise = cdist(points_a, points_b)
    np.testing.assert_allclose(a_to_b, pairwise.min(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b_to_a, pairwise.min(axis=0), rtol=1e-5, atol=1e-5)


def test_surface_is_six_connected_boundary_including_image_edge() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    assert surface_voxels(mask).sum() == 27 - 1
    full = np.ones((4, 4, 4), bool)
    assert surface_voxels(full).sum() == 64 - 8  # the image edge is background


def test_agrees_with_monai_on_random_shapes() -> None:
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    from scipy import ndimage

    spacing_xyz = (0.4, 0.7, 3.0)
    reference = ndimage.binary_closing(rng.random((12, 20, 20)) > 0.5).astype(np.uint8)
    prediction = ndimage.binary_closing(rng.random((12, 20, 20)) > 0.5).astype(np.uint8)
    metrics = evaluate(Volume(prediction, spacing_xyz), Volume(reference, spacing_xyz))["structures"]["femoral_cartilage"]
    y_pred = torch.as_tensor(prediction[None, None])
    y = torch.as_tensor(reference[None, None])
    spacing_kji = list(spacing_xyz[::-1])
    assd = monai_metrics.compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=spacing_kji)
    hd = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True, spacing=spacing_kji)
    hd95_directed_max = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing_kji)
    assert metrics["assd_mm"] == pytest.approx(float(assd), rel=1e-5)
    assert metrics["hd_mm"] == pytest.approx(float(hd), rel=1e-5)
    assert metrics["hd95_mm"] <= float(hd95_directed_max) + 1e-6
    dice = monai_metrics.compute_dice(y_pred, y, include_background=True)
    assert metrics["dice"] == pytest.approx(float(dice), rel=1e-6)


@pytest.mark.parametrize("spacing_xyz", [(1.0, 1.0, 1.0), (0.3, 0.5, 2.0)])
def test_nested_cubes(spacing_xyz: tuple[float, float, float]) -> None:
    reference = cube((12, 12, 12), (2, 2, 2), 8, label=5)
    prediction = cube((12, 12, 12), (4, 4, 4), 4, label=5)
    result = evaluate(Volume(prediction, spacing_xyz), Volume(reference, spacing_xyz))
    femur = result["structures"]["femur"]
    assert femur["precision"] == 1.0
    assert femur["recall"] == pytest.approx(4**3 / 8**3)
    assert femur["iou"] == pytest.approx(4**3 / 8**3)
    assert femur["dice"] == pytest.approx(2 * 4**3 / (4**3 + 8**3))
    voxel = float(np.prod(spacing_xyz))
    assert femur["volume_difference_mm3"] == pytest.approx((4**3 - 8**3) * voxel)
    assert femur["volume_difference_percent"] == pytest.approx(100 * (4**3 - 8**3) / 8**3)
    # Farthest boundary voxel: an outer corner, 2 voxels from the inner corner along every axis.
    assert femur["hd_mm"] == pytest.approx(2 * math.sqrt(sum(s * s for s in spacing_xyz)), rel=1e-6)

    # Boxes are convex, so the nearest boundary voxel has a closed form. Inner [4, 7]^3 to outer
    # [2, 9]^3: the nearest outer face, min over axes of min(c - 2, 9 - c) * spacing. Outer to
    # inner: the clamped point, |q - clamp(q, 4, 7)| per axis.
    spacing = np.asarray(spacing_xyz[::-1])
    inner = np.indices((4, 4, 4)).reshape(3, -1).T + 4
    inner = inner[np.any((inner == 4) | (inner == 7), axis=1)]
    outer = np.indices((8, 8, 8)).reshape(3, -1).T + 2
    outer = outer[np.any((outer == 2) | (outer == 9), axis=1)]
    inner_to_outer = (np.minimum(inner - 2, 9 - inner) * spacing).min(axis=1)
    outer_to_inner = np.linalg.norm((outer - np.clip(outer, 4, 7)) * spacing, axis=1)
    pooled = np.concatenate([inner_to_outer, outer_to_inner])
    assert femur["assd_mm"] == pytest.approx(pooled.mean(), rel=1e-6)
    assert femur["hd95_mm"] == pytest.approx(np.percentile(pooled, 95), rel=1e-6)
    # With anisotropic spacing the pooled convention differs from the larger directed 95th
    # percentile (MONAI's); with unit spacing ties make them equal.
    directed = max(np.percentile(inner_to_outer, 95), np.percentile(outer_to_inner, 95))
    if len(set(spacing_xyz)) > 1:
        assert femur["hd95_mm"] < directed - 1e-3


def test_nested_spheres_precision_one_recall_volume_ratio() -> None:
    grid = np.indices((31, 31, 31)) - 15
    radius = np.sqrt((grid**2).sum(axis=0))
    reference = (radius <= 12).astype(np.uint8) * 6
    prediction = (radius <= 7).astype(np.uint8) * 6
    spacing = (0.6, 0.6, 1.5)
    tibia = evaluate(Volume(prediction, spacing), Volume(reference, spacing))["structures"]["tibia"]
    assert tibia["precision"] == 1.0
    assert tibia["recall"] == pytest.approx(np.count_nonzero(prediction) / np.count_nonzero(reference))
    # Voxelised balls hold about 4/3 pi r^3 voxels, so recall is near (7/12)^3.
    assert tibia["recall"] == pytest.approx((7 / 12) ** 3, rel=0.05)


# --- conventions ---------------------------------------------------------------------------------


def test_empty_structure_conventions() -> None:
    spacing = (1.0, 1.0, 2.0)
    reference = cube((10, 10, 10), (2, 2, 2), 4, label=1)
    reference[7:9, 7:9, 7:9] = 2
    prediction = cube((10, 10, 10), (2, 2, 2), 4, label=1)
    prediction[0:2, 0:2, 0:2] = 3
    labels = {1: "one", 2: "missed", 3: "extra", 4: "absent"}
    result = evaluate(Volume(prediction, spacing), Volume(reference, spacing), labels=labels)
    s = result["structures"]

    assert s["one"]["dice"] == 1.0 and s["one"]["hd95_mm"] == 0.0 and s["one"]["assd_mm"] == 0.0

    missed = s["missed"]  # empty prediction
    assert missed["dice"] == 0 and missed["iou"] == 0 and missed["recall"] == 0
    assert math.isnan(missed["precision"])
    assert math.isinf(missed["hd95_mm"]) and math.isinf(missed["assd_mm"])
    assert missed["volume_difference_mm3"] == pytest.approx(-8 * 2.0)
    assert missed["volume_difference_percent"] == pytest.approx(-100.0)

    extra = s["extra"]  # empty reference
    assert extra["dice"] == 0 and extra["precision"] == 0
    assert math.isnan(extra["recall"]) and math.isinf(extra["hd95_mm"])
    assert extra["volume_difference_mm3"] == pytest.approx(8 * 2.0)
    assert math.isnan(extra["volume_difference_percent"])

    absent = s["absent"]  # empty in both
    for key in ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm"):
        assert math.isnan(absent[key]), key
    assert absent["volume_difference_mm3"] == 0

    # Means leave NaN out and keep inf.
    assert result["mean"]["dice"] == pytest.approx((1 + 0 + 0) / 3)
    assert result["mean"]["recall"] == pytest.approx((1 + 0) / 2)
    assert math.isinf(result["mean"]["hd95_mm"])

    decoded = json.loads(to_json(result))
    assert decoded["structures"]["absent"]["dice"] is None
    assert decoded["structures"]["missed"]["hd95_mm"] is None
    assert decoded["structures"]["one"]["dice"] == 1.0


def test_miou_includes_background() -> None:
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[0], reference[1] = 1, 2
    prediction = reference.copy()
    prediction[2] = 2
    result = evaluate(Volume(prediction, (1, 1, 1)), Volume(reference, (1, 1, 1)))
    # IoU: background 16/32, structure 1 = 1, structure 2 = 16/32.
    assert result["miou"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result["mean"]["iou"] == pytest.approx(0.75)


def test_different_grids_raise_or_resample() -> None:
    reference = Volume(cube((20, 20, 20), (5, 5, 5), 10), (1.0, 1.0, 1.0))
    # The same cube on a grid three times finer whose voxel centres include the reference's.
    fine = cube((60, 60, 60), (15, 15, 15), 30)
    prediction = Volume(fine, (1 / 3, 1 / 3, 1 / 3), (-1 / 3, -1 / 3, -1 / 3))
    with pytest.raises(InputError, match="differs from the reference grid"):
        evaluate(prediction, reference)
    result = evaluate(prediction, reference, resample=True)
    assert result["structures"]["femoral_cartilage"]["dice"] == 1.0
    assert any("resampled" in w for w in result["warnings"])


def test_non_integer_labels_refused() -> None:
    reference = Volume(cube((6, 6, 6), (1, 1, 1), 3).astype(np.float32), (1, 1, 1))
    prediction = Volume(reference.array + 0.5, (1, 1, 1))
    with pytest.raises(InputError, match="non-integer"):
        evaluate(prediction, reference)


# --- model choice --------------------------------------------------------------------------------


def metrics_row(dice: float, iou: float, precision: float, recall: float, hd95: float, assd: float) -> dict:
    return {"dice": dice, "iou": iou, "precision": precision, "recall": recall, "hd95_mm": hd95, "assd_mm": assd}


def test_rank_score_on_hand_made_table() -> None:
    table = {
        "A": metrics_row(0.90, 0.82, 0.91, 0.89, 3.0, 1.0),  # overlap 0.88,   distance 2.0
        "B": metrics_row(0.92, 0.85, 0.90, 0.93, 5.0, 1.4),  # overlap 0.90,   distance 3.2
        "C": metrics_row(0.85, 0.74, 0.86, 0.84, 2.0, 0.8),  # overlap 0.8225, distance 1.4
        "D": metrics_row(0.88, 0.79, 0.88, 0.88, 1.6, 0.8),  # overlap 0.8575, distance 1.2
    }
    ranking = choose_model(table)
    # Overlap ranks B1 A2 D3 C4; distance ranks D1 C2 A3 B4; scores A5 B5 C6 D4.
    assert [r.model for r in ranking] == ["D", "B", "A", "C"]  # A and B tie; B has the better overlap
    by_model = {r.model: r for r in ranking}
    assert by_model["D"].score == 4 and by_model["A"].score == 5 and by_model["B"].score == 5 and by_model["C"].score == 6
    assert by_model["C"].overlap_composite == pytest.approx(0.8225)
    assert by_model["B"].distance_composite == pytest.approx(3.2)
    assert [r.place for r in ranking] == [1, 2, 3, 4]


def test_rank_score_ties_nan_and_evaluate_results() -> None:
    same = metrics_row(0.9, 0.8, 0.9, 0.9, 2.0, 1.0)
    ranking = choose_model({"x": same, "y": dict(same), "z": metrics_row(0.5, 0.4, 0.5, 0.5, math.inf, math.nan)})
    by_model = {r.model: r for r in ranking}
    assert by_model["x"].overlap_rank == 1.5 and by_model["y"].distance_rank == 1.5
    assert ranking[-1].model == "z" and by_model["z"].distance_rank == 3
    with pytest.raises(ValueError, match="lacks metrics"):
        choose_model({"x": {"dice": 0.9}})

    # evaluate() results (their case means) and summaries over cases are accepted as they are.
    reference = Volume(cube((16, 16, 16), (3, 3, 3), 8), (1, 1, 1))
    near = evaluate(Volume(cube((16, 16, 16), (4, 3, 3), 8), (1, 1, 1)), reference)
    far = evaluate(Volume(cube((16, 16, 16), (6, 3, 3), 8), (1, 1, 1)), reference)
    assert [r.model for r in choose_model({"far": summarize([far, far]), "near": near})] == ["near", "far"]
    assert summarize([near, far])["mean"]["dice"] == pytest.approx((7 / 8 + 5 / 8) / 2)


# --- command line --------------------------------------------------------------------------------


def test_cli_evaluate_json_and_table(tmp_path, capsys) -> None:
    spacing = (0.5, 0.5, 1.5)
    reference = cube((16, 16, 16), (3, 3, 3), 8, label=1)
    reference[12:15, 12:15, 12:15] = 5
    prediction = cube((16, 16, 16), (5, 3, 3), 8, label=1)  # shifted 2 slices (k)
    prediction[12:15, 12:15, 12:15] = 5
    write_volume(Volume(reference, spacing), tmp_path / "reference.nrrd")
    write_volume(Volume(prediction, spacing), tmp_path / "prediction.nrrd")

    code = cli.main(["evaluate", str(tmp_path / "prediction.nrrd"), str(tmp_path / "reference.nrrd"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    cartilage = result["structures"]["femoral_cartilage"]
    assert cartilage["dice"] == pytest.approx(1 - 2 / 8)
    assert cartilage["hd95_mm"] == pytest.approx(2 * 1.5, rel=1e-6)
    assert result["structures"]["femur"]["dice"] == 1.0
    assert result["mean"]["dice"] == pytest.approx((0.75 + 1.0) / 2)

    assert cli.main(["evaluate", str(tmp_path / "prediction.nrrd"), str(tmp_path / "reference.nrrd")]) == 0
    table = capsys.readouterr().out
    assert "femoral_cartilage" in table and "0.750" in table and "MIoU" in table


def test_seg_nrrd_matched_by_structure(tmp_path) -> None:
    segfile = pytest.importorskip("KneeSegLogic.segfile")
    from KneeSegLogic.evaluation.metrics import evaluate_files

    spacing = (0.7, 0.7, 2.0)
    reference = cube((12, 12, 12), (2, 2, 2), 6, label=10)
    prediction = cube((12, 12, 12), (2, 2, 3), 6, label=10)
    segfile.write_segmentation(Volume(prediction, spacing), tmp_path / "prediction.seg.nrrd")
    write_volume(Volume(reference, spacing), tmp_path / "reference.nrrd")
    result = evaluate_files(tmp_path / "prediction.seg.nrrd", tmp_path / "reference.nrrd")
    meniscus = result["structures"]["medial_meniscus"]
    assert meniscus["dice"] == pytest.approx(5 / 6)
    assert meniscus["hd95_mm"] == pytest.approx(0.7, rel=1e-6)
    assert "medial_meniscus" in format_table(result)
