"""Fusion on the working grid equals fusing on the input grid; working-grid geometry; masked maps."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation import inference
from KneeSegLogic.segmentation.calibration import decide_labels
from KneeSegLogic.segmentation.normalisation import CANONICAL_ORIENTATION
from KneeSegLogic.segmentation.uncertainty import (
    UNCERTAINTY_STEP,
    entropy,
    foreground_masked,
    label_sums,
    per_structure,
    quantised,
)
from KneeSegLogic.tissues import TISSUES

torch.set_num_threads(1)
CLASSES = 11
OFFSETS = [0.0, -0.2, -0.5, -0.2, -0.5, -0.4, -0.4, -0.4, -0.4, -0.3, -0.3]


def _direction(rng: np.random.Generator, oblique: bool) -> np.ndarray:
    permutation, signs = rng.permutation(3), rng.choice([-1.0, 1.0], 3)
    direction = np.zeros((3, 3))
    direction[permutation, np.arange(3)] = signs
    if oblique:
        rotation, _ = np.linalg.qr(np.eye(3) + rng.normal(0, 0.25, (3, 3)))
        direction = rotation @ direction
    return direction


def test_working_grid_is_dicomorient_geometry_from_the_direction_alone():
    rng = np.random.default_rng(1)
    for trial in range(200):
        size = rng.integers(2, 40, 3)
        spacing, origin = rng.uniform(0.3, 3, 3), rng.uniform(-100, 100, 3)
        direction = _direction(rng, oblique=trial % 2 == 1)
        volume = Volume(np.zeros(size[::-1], np.uint8), tuple(spacing), tuple(origin), direction)
        image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
        image.SetSpacing(tuple(spacing))
        image.SetOrigin(tuple(origin))
        image.SetDirection(tuple(direction.ravel()))
        expected = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        grid = inference.working_grid(volume, tuple(expected.GetSpacing()))
        assert grid.size == expected.GetSize()
        np.testing.assert_allclose(grid.origin, expected.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(grid.direction.ravel(), expected.GetDirection(), atol=1e-12)


def _member_map(grid: Volume, rng: np.random.Generator, centre_shift: float) -> Volume:
    """Smooth softmax maps with nested blobs of several classes (boundaries, certain and unsure parts)."""
    shape = grid.array.shape
    k, j, i = np.indices(shape, dtype=np.float32)
    logits = np.zeros((*shape, CLASSES), np.float32)
    for c in range(1, CLASSES):
        centre = rng.uniform(0.2, 0.8, 3) * np.asarray(shape) + centre_shift
        radius = rng.uniform(0.15, 0.35) * min(shape)
        distance = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
        logits[..., c] = rng.uniform(1.5, 6) * (1 - distance / radius)
    logits += rng.normal(0, 0.3, logits.shape).astype(np.float32)
    probabilities = torch.from_numpy(logits).softmax(-1).numpy()
    return Volume(probabilities, grid.spacing, grid.origin, grid.direction)


@pytest.mark.parametrize("oblique", [False, True])
def test_fuse_and_decide_equals_deciding_on_every_resampled_channel(oblique):
    rng = np.random.default_rng(3 if oblique else 4)
    reference = Volume(
        np.zeros((17, 41, 37), np.float32), (0.7, 0.6, 1.3), (5.0, -12.0, 30.0), _direction(rng, oblique)
    )
    fine = inference.working_grid(reference, (0.9, 0.9, 1.5))
    coarse = inference.working_grid(reference, (1.4, 1.4, 1.5))
    members = [(_member_map(fine, rng, 0.0), 0.6), (_member_map(coarse, rng, 0.5), 0.4)]
    channels, member_entropy = inference.fuse_on_grid(members, reference)
    expected = decide_labels(channels, OFFSETS)
    fusion = inference.fuse_and_decide(members, reference, OFFSETS)
    assert len(np.unique(expected)) > 5 and 0.02 < np.mean(expected == 0) < 0.9
    assert np.array_equal(fusion.channel_index, expected)
    # Boundary cells: entropy of the interpolated channels; elsewhere the interpolated working-grid
    # entropy, never above it (entropy is concave) and close to it.
    exact = entropy(channels)
    gap = exact - fusion.entropy
    assert gap.min() > -1e-5
    # These maps are rougher than a network's (noise 0.3 on the logits); measured: median 0.0024, max 0.037.
    assert np.median(gap) < 0.005 and gap.max() < 0.05
    assert fusion.entropy.dtype == np.float32
    np.testing.assert_allclose(fusion.mean_member_entropy, member_entropy, atol=1e-5)
    np.testing.assert_allclose(fusion.probabilities[5], channels[5], atol=1e-5)
    np.testing.assert_allclose(fusion.probabilities[0], channels[0], atol=1e-5)


def test_fusion_reports_progress_per_slab(monkeypatch):
    rng = np.random.default_rng(6)
    reference = Volume(np.zeros((24, 20, 18), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    members = [(_member_map(inference.working_grid(reference, (1.5, 1.5, 2.0)), rng, 0.0), 1.0)]
    monkeypatch.setattr(inference, "SLAB_VOXELS", 20 * 18 * 5)  # 5 slices per slab
    fractions: list[float] = []
    inference.fuse_and_decide(members, reference, OFFSETS, progress=fractions.append)
    assert fractions == [0.0, 5 / 24, 10 / 24, 15 / 24, 20 / 24]


def test_fuse_and_decide_falls_back_when_the_grids_are_oblique_to_each_other():
    rng = np.random.default_rng(5)
    reference = Volume(np.zeros((9, 20, 18), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    tilted = Volume(np.zeros((12, 24, 24), np.uint8), (1.0, 1.0, 1.5), (-2.0, -3.0, -1.0), _direction(rng, True))
    members = [(_member_map(tilted, rng, 0.0), 1.0)]
    assert inference.GridMap.between(tilted, reference, torch.device("cpu")) is None
    channels, _ = inference.fuse_on_grid(members, reference)
    fusion = inference.fuse_and_decide(members, reference, OFFSETS)
    assert np.array_equal(fusion.channel_index, decide_labels(channels, OFFSETS))
    assert fusion.mean_member_entropy is None


def test_foreground_masked_keeps_the_city_block_neighbourhood_of_the_structures():
    rng = np.random.default_rng(0)
    labels = np.zeros((30, 40, 45), np.uint8)
    labels[5:25, 10:30, 15:35] = (rng.random((20, 20, 20)) > 0.97) * 3
    labels[0, 0, 0], labels[29, 39, 2] = 1, 2  # at the border
    uncertainty = rng.random(labels.shape).astype(np.float32)
    for margin in (0, 1, 2):
        near = ndimage.binary_dilation(labels > 0, iterations=margin) if margin else labels > 0
        assert np.array_equal(foreground_masked(uncertainty, labels, margin), np.where(near, uncertainty, 0))
    assert not foreground_masked(uncertainty, np.zeros_like(labels)).any()


def test_quantised_maps_hold_multiples_of_the_step():
    values = np.random.default_rng(0).random(10000).astype(np.float32)
    stored = quantised(values)
    assert stored.dtype == np.float32
    assert np.abs(stored - values).max() <= UNCERTAINTY_STEP / 2 + 1e-6
    assert np.allclose(stored / UNCERTAINTY_STEP, np.round(stored / UNCERTAINTY_STEP), atol=1e-3)
    assert len(np.unique(stored)) <= 1001


def test_written_maps_are_masked_by_default_and_full_on_request(tmp_path):
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import write_uncertainty_maps

    rng = np.random.default_rng(2)
    labels = Volume(np.zeros((12, 30, 30), np.uint8), (0.5, 0.5, 1.0), (1.0, 2.0, 3.0), np.eye(3))
    labels.array[4:8, 10:20, 10:20] = 5
    total = rng.random(labels.array.shape).astype(np.float32)
    maps = {
        "uncertainty": total,
        "uncertainty_foreground": foreground_masked(total, labels.array),
        "mutual_information": total / 2,
    }
    near = ndimage.binary_dilation(labels.array > 0, iterations=2)
    for full, folder in ((False, tmp_path / "masked"), (True, tmp_path / "full")):
        folder.mkdir()
        write_uncertainty_maps(labels, maps, folder, full=full)
        for name, values in (("uncertainty", total), ("mutual_information", total / 2)):
            stored = read_volume(folder / f"{name}.nrrd")
            assert stored.same_grid(labels, atol=1e-9)
            kept = np.ones_like(near) if full else near
            np.testing.assert_allclose(stored.array[kept], values[kept], atol=UNCERTAINTY_STEP / 2 + 1e-6)
            assert not stored.array[~kept].any()
            header = sitk.ReadImage(str(folder / f"{name}.nrrd"))
            assert header.GetMetaData("KneeSeg.quantisation_step") == "0.001"
            assert (header.GetMetaData("KneeSeg.uncertainty_mask") == "none") == full


def test_label_sums_and_per_structure_equal_the_direct_masks():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 11, (23, 31, 17)).astype(np.uint8)
    labels[labels == 4] = 0  # a structure absent
    uncertainty = rng.random(labels.shape).astype(np.float32)
    counts = label_sums(labels, slab_voxels=1000)  # slabs that do not divide the array
    assert counts.tolist() == [int(np.count_nonzero(labels == v)) for v in range(11)]
    sums = label_sums(labels, uncertainty, slab_voxels=1000)
    np.testing.assert_allclose(sums, [uncertainty[labels == v].sum(dtype=np.float64) for v in range(11)], rtol=1e-12)
    summary = per_structure(uncertainty, labels)
    assert per_structure(uncertainty, labels, counts) == summary  # counts passed in: the same means
    assert "patellar_cartilage" not in summary and len(summary) == 9
    for tissue in TISSUES:
        if tissue.label != 4:
            assert summary[tissue.key] == pytest.approx(float(uncertainty[labels == tissue.label].mean()), abs=6e-6)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)])
def test_a_permuted_working_grid_holds_the_same_voxels_in_space(order):
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    grid = Volume(np.zeros((4, 5, 6), np.uint8), (0.5, 0.75, 1.5), (3.0, -2.0, 7.0), direction)
    permuted = inference._permuted_grid(grid, order)
    assert permuted.array.shape == tuple(grid.array.shape[a] for a in order)
    kji = np.array([3, 1, 4])  # a voxel of the original grid, array order
    moved = kji[list(order)]  # the same voxel's array index in the permuted grid
    point = grid.index_to_physical() @ np.r_[kji[::-1], 1.0]
    np.testing.assert_allclose(permuted.index_to_physical() @ np.r_[moved[::-1], 1.0], point)
    assert inference._axis_order(grid, permuted) == list(order)
    shifted = Volume(permuted.array, permuted.spacing, (3.0, -2.0, 7.5), permuted.direction)
    assert inference._axis_order(grid, shifted) is None


@pytest.mark.parametrize("oblique", [False, True])
def test_a_structure_through_the_working_grids_keeps_its_boundary(oblique):
    """The geometry alone (no network) does not move a boundary: a ball of known radius on a fine
    scan grid, its one-hot maps sampled linearly onto the default model's two working grids
    (0.75 and 1.15 mm in-plane, 1.5 mm slices, as inference samples the scan) and fused back,
    keeps its radius and its centre within 0.05 mm (half a fine voxel, the shift a grid or fusion
    offset would cause, is 0.2 mm; half a working voxel 0.4 mm)."""
    from KneeSegLogic.io.volume import resample_to_grid

    rng = np.random.default_rng(3)
    spacing = (0.4, 0.4, 0.8)  # (i, j, k) mm: a fine sagittal-like scan
    shape = (40, 80, 80)  # (k, j, i)
    direction = _direction(rng, oblique)
    extent = np.asarray(shape[::-1]) * np.asarray(spacing)
    origin = -direction @ (extent / 2 - np.asarray(spacing) / 2)  # voxel grid centred on 0 mm
    scan = Volume(np.zeros(shape, np.uint8), spacing, tuple(origin), direction)
    points = scan.index_to_physical()
    k, j, i = np.indices(shape)
    physical = np.stack([i, j, k, np.ones_like(i)], -1) @ points.T
    radius = 11.0
    ball = np.linalg.norm(physical[..., :3], axis=-1) <= radius
    members = []
    for in_plane in (0.75, 1.15):
        grid = inference.working_grid(scan, (1.5, in_plane, in_plane))
        channels = [
            resample_to_grid(scan.with_array(mask.astype(np.float32)), grid, interpolation="linear").array
            for mask in (~ball, ball)
        ]
        members.append((grid.with_array(np.stack(channels, -1).astype(np.float32)), 0.5))
    fused = inference.fuse_and_decide(members, scan).channel_index == 1
    fine_voxel = float(np.prod(spacing))
    found_radius = (3 * np.count_nonzero(fused) * fine_voxel / (4 * np.pi)) ** (1 / 3)
    true_radius = (3 * np.count_nonzero(ball) * fine_voxel / (4 * np.pi)) ** (1 / 3)
    assert abs(found_radius - true_radius) < 0.05, (found_radius, true_radius)
    centre = physical[..., :3][fused].mean(0)
    assert np.linalg.norm(centre) < 0.05, centre
