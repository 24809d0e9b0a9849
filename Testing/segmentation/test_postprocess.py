"""Post-processing: EDT ball closing equals scikit-image's, components, holes, label priority, MESE refinement."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import SAMPLE_DATA
from scipy import ndimage
from skimage.morphology import ball

from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.postprocess import (
    apply_postprocessing,
    ball_closing,
    ball_opening,
    close_labels,
    fill_holes,
    fill_label_holes,
    keep_largest_components,
    largest_components,
    mese_candidates,
    open_labels,
    refine_mese_cartilage,
)


def skimage_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """scikit-image's binary closing with ball(radius), default border mode."""
    from skimage.morphology import binary_closing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in 0.26 in favour of closing()
        return binary_closing(mask, ball(radius))


def random_blobs(shape: tuple[int, int, int], seed: int, level: float = 0.05) -> np.ndarray:
    """Smooth random shapes filling the whole box, so many touch the volume border."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return noise > level


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_ball_closing_equals_skimage_on_random_masks_touching_the_border(radius: int) -> None:
    for seed in range(3):
        mask = random_blobs((26, 31, 35), seed + 10 * radius)
        expected = skimage_closing(mask, radius)
        assert np.count_nonzero(expected & ~mask) > 0  # the closing does something here
        assert np.array_equal(ball_closing(mask, radius), expected)
        # objects cut by every face of the volume
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, :, -1].any()


@pytest.mark.parametrize("radius", [2, 5])
def test_ball_closing_of_a_small_object_far_from_the_border(radius: int) -> None:
    mask = np.zeros((40, 44, 48), bool)
    mask[15:25, 16:28, 18:30] = random_blobs((10, 12, 12), radius, level=-0.1)
    expected = skimage_closing(mask, radius)
    assert np.array_equal(ball_closing(mask, radius), expected)


def test_ball_closing_of_the_real_femur_equals_skimage() -> None:
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd").array
    femur = labels[::2, ::2, ::2] == 5  # downsampled to keep the test fast
    expected = skimage_closing(femur, 3)
    assert np.count_nonzero(expected ^ femur) > 100
    assert np.array_equal(ball_closing(femur, 3), expected)


def test_anisotropic_ball_closing_uses_a_sphere_in_mm() -> None:
    spacing = (1.2, 0.5, 0.8)  # mm per array axis
    radius = 2.0
    mask = random_blobs((20, 40, 30), 3)
    reach = [int(radius // s) for s in spacing]
    offsets = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(reach, spacing)], indexing="ij")
    footprint = sum(o**2 for o in offsets) <= radius**2
    # scikit-image's semantics written out: outside is False for the dilation, True for the erosion
    dilated = ndimage.binary_dilation(mask, footprint, border_value=0)
    expected = ndimage.binary_erosion(dilated, footprint, border_value=1)
    ours = ball_closing(mask, radius, spacing=spacing)
    assert np.array_equal(ours, expected)
    assert not np.array_equal(ours, ball_closing(mask, 2))  # the spacing mattered


def test_ball_closing_edge_cases() -> None:
    empty = np.zeros((5, 6, 7), bool)
    assert not ball_closing(empty, 3).any()
    mask = random_blobs((8, 9, 10), 1)
    assert np.array_equal(ball_closing(mask, 0), mask)
    full = np.ones((6, 6, 6), bool)
    assert ball_closing(full, 2).all()
    with pytest.raises(ValueError):
        ball_closing(np.zeros((2, 2, 2, 2), bool), 1)
    with pytest.raises(ValueError):
        ball_closing(mask, -1)
    with pytest.raises(ValueError):
        ball_closing(mask, 1, spacing=(1.0, 1.0))


def test_largest_components_counts_sizes_and_connectivity() -> None:
    mask = np.zeros((20, 20, 20), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[10:15, 10:15, 10:15] = True  # 125
    mask[1:3, 15:19, 15:19] = True  # 32
    assert np.count_nonzero(largest_components(mask)) == 125
    assert np.count_nonzero(largest_components(mask, components=2)) == 125 + 32
    assert np.count_nonzero(largest_components(mask, components=5)) == 125 + 32 + 27
    corner = np.zeros((4, 4, 4), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = corner[3, 3, 3] = True  # first two touch by a corner only
    assert np.count_nonzero(largest_components(corner)) == 2  # 26-connectivity by default
    assert np.count_nonzero(largest_components(corner, connectivity=1)) == 1


def test_keep_largest_components_per_label() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 5
    labels[12:14, 12:14, 12:14] = 5  # stray piece of the femur
    labels[12:18, 2:6, 2:6] = 6
    labels[15, 15, 15] = 7
    out = keep_largest_components(labels, label_values=[5, 6])
    assert np.count_nonzero(out == 5) == 216 and np.count_nonzero(out == 6) == 96
    assert out[15, 15, 15] == 7  # not asked for: untouched
    assert np.all(out[12:14, 12:14, 12:14] == 0)
    assert np.count_nonzero(labels == 5) == 224  # input not modified


def test_fill_holes_fills_cavities_only() -> None:
    mask = np.zeros((12, 12, 12), bool)
    mask[2:9, 2:9, 2:9] = True
    mask[4:7, 4:7, 4:7] = False  # closed cavity: 27 voxels
    filled = fill_holes(mask)
    assert np.count_nonzero(filled) == 7**3
    tunnel = mask.copy()
    tunnel[5, 5, :] = False  # a tunnel through the block connects the cavity to the outside
    assert np.array_equal(fill_holes(tunnel), tunnel)
    labels = mask.astype(np.uint8) * 5
    labels[5, 5, 5] = 1  # another structure inside the cavity keeps its voxel
    out = fill_label_holes(labels)
    assert out[5, 5, 5] == 1 and np.count_nonzero(out == 5) == 7**3 - 1


def test_close_labels_fills_only_background_in_priority_order() -> None:
    labels = np.zeros((24, 28, 30), np.uint8)
    labels[random_blobs(labels.shape, 21, level=0.0)] = 1
    labels[random_blobs(labels.shape, 22, level=0.0) & (labels == 0)] = 5
    closed = {v: ball_closing(labels == v, 3) for v in (1, 5)}
    contested = closed[1] & closed[5] & (labels == 0)
    assert contested.sum() > 100
    first = close_labels(labels, 3, label_values=[1, 5])
    second = close_labels(labels, 3, label_values=[5, 1])
    assert np.all(first[labels > 0] == labels[labels > 0])  # structures never overwrite each other
    assert np.all(first[contested] == 1) and np.all(second[contested] == 5)
    only = (labels == 0) & (closed[1] ^ closed[5])
    assert np.array_equal(first[only], second[only])
    assert np.array_equal(first == 5, (labels == 5) | (closed[5] & (labels == 0) & ~closed[1]))
    default = close_labels(labels, 3)  # cartilage (1) before bone (5)
    assert np.array_equal(default, first)


def mese_case() -> tuple[np.ndarray, np.ndarray]:
    """Probability and T2 maps, one test situation per slice (axis 0), 500 voxels per slice."""
    probability = np.zeros((7, 30, 30))
    t2 = np.full(probability.shape, 40.0)
    region = (slice(0, 20), slice(0, 25))  # 500 voxels
    probability[(0, *region)] = 0.9  # kept
    probability[(1, *region)] = 0.9
    t2[1, 0:4, 0:25] = 150.0  # 100 voxels out of range -> 400 left -> slice dropped
    probability[(2, *region)] = 0.501  # exactly at threshold: kept
    probability[(3, *region)] = 0.5  # below threshold
    probability[(4, *region)] = 0.9
    t2[4, 0, 0:25] = 0.0  # inclusive lower bound: kept
    t2[4, 1, 0:25] = 100.0  # inclusive upper bound: kept
    t2[4, 2, 0:25] = np.nan  # failed fit: dropped -> 475 left
    probability[5, 0:17, 0:25] = 0.9  # 425 voxels: kept
    probability[6, 0:17, 0:24] = 0.9
    probability[6, 17, 0:16] = 0.9  # 424 voxels: dropped
    return probability, t2


def test_mese_refinement_thresholds() -> None:
    probability, t2 = mese_case()
    counts = refine_mese_cartilage(probability, t2).sum(axis=(1, 2))
    assert counts.tolist() == [500, 0, 500, 0, 475, 425, 0]
    without_t2 = refine_mese_cartilage(probability).sum(axis=(1, 2))
    assert without_t2.tolist() == [500, 500, 500, 0, 500, 425, 0]
    relaxed = refine_mese_cartilage(probability, t2, min_voxels_per_slice=400, t2_range_ms=(0.0, 200.0))
    assert relaxed.sum(axis=(1, 2)).tolist() == [500, 500, 500, 0, 475, 425, 424]
    across = refine_mese_cartilage(np.moveaxis(probability, 0, 2), np.moveaxis(t2, 0, 2), slice_axis=2)
    assert across.sum(axis=(0, 1)).tolist() == counts.tolist()
    candidates = mese_candidates(np.array([0.0, 0.01, 0.0101, 0.5]))
    assert candidates.tolist() == [False, False, True, True]


def test_apply_postprocessing_named_steps() -> None:
    array = np.zeros((14, 30, 32), np.uint8)
    array[3:11, 5:25, 4:28] = 5
    array[6:8, 12:16, 10:14] = 0  # a cavity
    array[7, 2, 2] = 5  # stray femur voxel
    array[0:2, 27:29, 0:2] = 6  # tibia, with two specks
    array[1, 1, 1] = array[12, 28, 30] = 6
    volume = Volume(array.copy(), (0.4, 0.5, 1.5), (10.0, -5.0, 3.0))
    steps = [
        {"name": "largest_component", "labels": [5, 6]},
        {"name": "fill_holes", "labels": [5]},
        {"name": "closing", "radius_mm": 1.6, "labels": [5]},
    ]
    out = apply_postprocessing(volume, steps)
    expected = keep_largest_components(array, 1, [5, 6])
    expected = fill_label_holes(expected, [5])
    expected = close_labels(expected, 1.6, (1.5, 0.5, 0.4), [5])
    assert np.array_equal(out.array, expected)
    assert out.same_grid(volume) and np.array_equal(volume.array, array)
    assert out.array[7, 2, 2] == 0 and np.count_nonzero(out.array == 6) == 8
    assert np.all(out.array[6:8, 12:16, 10:14] == 5)
    with pytest.raises(KneeSegError, match="unknown name"):
        apply_postprocessing(volume, [{"name": "dilation"}])
    with pytest.raises(KneeSegError, match="radius"):
        apply_postprocessing(volume, [{"name": "closing", "radius": 2}])
    with pytest.raises(KneeSegError, match="probability"):
        apply_postprocessing(volume, [{"name": "mese_refinement"}])


def test_apply_postprocessing_mese_refinement_step() -> None:
    probability, t2 = mese_case()
    labels = np.where(probability > 0.5, 1, 0).astype(np.uint8)
    labels[:, 25:, 25:] = 5  # bone is left alone
    probabilities = np.stack([1.0 - probability, probability])
    step = {"name": "mese_refinement", "label": 1, "min_voxels_per_slice": 425}
    out = apply_postprocessing(Volume(labels, (0.3, 0.3, 2.0)), [step], probabilities, t2)
    assert np.array_equal(out.array == 1, refine_mese_cartilage(probability, t2))
    assert np.array_equal(out.array == 5, labels == 5)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_ball_opening_equals_skimage_away_from_the_border(radius: int) -> None:
    from skimage.morphology import binary_opening

    for seed in range(3):
        mask = np.zeros((40, 44, 48), bool)
        mask[8:32, 8:36, 8:40] = random_blobs((24, 28, 32), seed + 10 * radius, level=-0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            expected = binary_opening(mask, ball(radius))
        assert np.count_nonzero(mask & ~expected) > 0  # the opening does something here
        assert np.array_equal(ball_opening(mask, radius), expected)


def test_ball_opening_removes_a_thin_spur_and_keeps_a_thick_body() -> None:
    # A 4 mm-radius ball of bone with a 1 mm-thick spur sticking out 10 mm, at 0.5 x 0.5 x 1 mm.
    spacing = np.array([1.0, 0.5, 0.5])  # array axes (k, j, i)
    k, j, i = np.indices((20, 60, 60)) * spacing[:, None, None, None]
    body = (k - 10) ** 2 + (j - 15) ** 2 + (i - 15) ** 2 <= 4**2
    spur = (np.abs(k - 10) <= 0.5) & (np.abs(j - 15) <= 0.5) & (i > 15) & (i < 29)
    opened = ball_opening(body | spur, 1.5, spacing)
    assert not (opened & spur & (i > 19 + 1.5)).any()  # gone beyond the ball's reach from the body
    inner = (k - 10) ** 2 + (j - 15) ** 2 + (i - 15) ** 2 <= 2.4**2
    assert opened[inner].all() and not (opened & ~(body | spur)).any()
    assert np.count_nonzero(body & ~opened) < 0.1 * np.count_nonzero(body)  # only its rim's corners
    assert not ball_opening(spur, 1.5, spacing).any()  # nothing survives that is thinner than the ball
    assert np.array_equal(ball_opening(body, 0, spacing), body)
    with pytest.raises(ValueError, match="radius"):
        ball_opening(body, -1)


def test_open_labels_turns_only_removed_voxels_into_background() -> None:
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[4:16, 5:30, 5:30] = 5
    labels[9:11, 14:16, 30:38] = 5  # a 2-voxel spur of femur
    labels[4:16, 30:34, 5:30] = 1  # cartilage beside it, not opened
    out = open_labels(labels, 2, None, [5])
    assert (out[9:11, 14:16, 31:38] == 0).all()
    assert np.array_equal(out == 1, labels == 1)
    assert set(np.unique(out[labels == 5])) <= {0, 5} and ((out == 5) <= (labels == 5)).all()
    volume = Volume(labels, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(apply_postprocessing(volume, [{"name": "opening", "radius_mm": 2, "labels": [5]}]).array, out)


def _planted_errors(labels: np.ndarray) -> np.ndarray:
    """A label map with a tibia speck, a femur spur, a femur hole and a meniscus crumb planted."""
    planted = labels.copy()
    k, j, i = (int(np.median(a)) for a in np.nonzero(labels == 5))
    planted[k, j : j + 60, i] = 5  # a one-voxel femur spur
    planted[k, j - 3 : j, i - 3 : i] = 0  # a hole inside the femur
    planted[k - 20 : k - 17, j - 40 : j - 37, i : i + 3] = 6  # a tibia speck in the femur's marrow
    planted[k + 20 : k + 22, j + 40 : j + 42, i : i + 2] = 9  # a meniscus crumb
    return planted


def test_steps_run_on_the_structures_box_give_the_labels_of_the_whole_grid() -> None:
    from KneeSegLogic.segmentation.postprocess import CONSISTENCY_STEPS, STEPS, _working_box

    knee = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    # The knee in a larger field of view (20 voxels of air all round, the grid extended outwards).
    pad = 20
    origin = np.asarray(knee.origin) - knee.direction @ (np.asarray(knee.spacing) * pad)
    array = np.pad(_planted_errors(knee.array.astype(np.uint8)), pad)
    volume = Volume(array, knee.spacing, tuple(origin), knee.direction)
    steps = [
        {"name": "opening", "radius_mm": 2.0, "labels": [5, 6, 8]},
        {"name": "largest_component", "labels": [5, 6, 7, 8], "components": 1},
        {"name": "fill_holes", "labels": [5, 6, 7, 8]},
        {"name": "closing", "radius_mm": 1.0, "labels": [1]},
        *CONSISTENCY_STEPS,
    ]
    box = _working_box(volume, steps)
    assert box is not None and np.prod([b.stop - b.start for b in box]) < 0.9 * array.size
    whole = volume.array
    for step in steps:  # each step alone finds its own label boxes; apply_postprocessing reuses them
        options = {k: v for k, v in step.items() if k != "name"}
        whole = STEPS[step["name"]](whole, volume, {}, **options)
    boxed = apply_postprocessing(volume, steps)
    assert boxed.same_grid(volume, atol=0)
    assert int((whole != volume.array).sum()) > 60  # the planted errors were acted on
    np.testing.assert_array_equal(boxed.array, whole)

