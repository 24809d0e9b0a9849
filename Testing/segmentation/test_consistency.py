"""Anatomical consistency rules of post-processing, each tested on the real bundled label map with a
planted error, and on the real MESE scan segmented by the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_DATA, shared_data
from scipy import ndimage

from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.postprocess import (
    CONSISTENCY_STEPS,
    apply_postprocessing,
    clear_fibula_contact,
    enforce_medial_lateral_sides,
    keep_major_components,
    left_right_coordinates,
    medial_lateral_split,
)
from KneeSegLogic.tissues import tissue

MEDIAL_MENISCUS, LATERAL_MENISCUS = tissue("medial_meniscus").label, tissue("lateral_meniscus").label
MEDIAL_TIBIAL, LATERAL_TIBIAL = tissue("medial_tibial_cartilage").label, tissue("lateral_tibial_cartilage").label
FIBULA = tissue("fibula").label
SOFT = [t.label for t in (tissue(k) for k in range(1, 11)) if t.group in ("cartilage", "meniscus")]


@pytest.fixture(scope="module")
def knee() -> Volume:
    """The bundled right knee (pymskt), cropped to its labelled structures to keep the tests fast."""
    volume = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    box = tuple(slice(max(int(a.min()) - 3, 0), int(a.max()) + 4) for a in np.nonzero(volume.array))
    k, j, i = (s.start for s in box)
    origin = np.asarray(volume.origin) + volume.direction @ (np.array([i, j, k]) * np.asarray(volume.spacing))
    return Volume(volume.array[box].astype(np.uint8), volume.spacing, origin, volume.direction)


def test_the_clean_knee_is_left_unchanged(knee):
    boundary, medial_sign = medial_lateral_split(knee)
    # A right knee: medial is toward the patient's left (+LR).
    assert medial_sign == 1
    # The boundary lies between the two menisci.
    medial = left_right_coordinates(knee, knee.array == MEDIAL_MENISCUS)
    lateral = left_right_coordinates(knee, knee.array == LATERAL_MENISCUS)
    assert lateral.max() < boundary < medial.min()
    result = apply_postprocessing(knee, CONSISTENCY_STEPS)
    assert np.array_equal(result.array, knee.array)


def test_medial_labels_on_the_lateral_side_are_swapped_back(knee):
    planted = knee.array.copy()
    # The anterior half of the lateral meniscus and a third of the medial plate get the other side's label.
    lateral = np.argwhere(planted == LATERAL_MENISCUS)
    front = lateral[lateral[:, 1] < np.median(lateral[:, 1])]
    planted[tuple(front.T)] = MEDIAL_MENISCUS
    medial_plate = np.argwhere(planted == MEDIAL_TIBIAL)
    third = medial_plate[: len(medial_plate) // 3]
    planted[tuple(third.T)] = LATERAL_TIBIAL
    assert np.count_nonzero(planted != knee.array) == len(front) + len(third) > 5000
    fixed = enforce_medial_lateral_sides(knee.with_array(planted))
    assert np.array_equal(fixed, knee.array)


def test_cartilage_and_meniscus_on_the_fibula_are_removed(knee):
    planted = knee.array.copy()
    fibula = np.argwhere(knee.array == FIBULA)
    # A 3 mm ball of "medial meniscus" on top of the fibular head (lowest j is superior here? take the
    # fibula voxel nearest the tibial plateau: the one closest to the tibia's centroid).
    tibia_centre = np.argwhere(knee.array == tissue("tibia").label).mean(0)
    head = fibula[np.argmin(np.linalg.norm((fibula - tibia_centre) * knee.spacing_kji, axis=1))]
    # Voxels within 3 mm of the head: searched in the ball's bounding box, not the whole knee.
    reach = np.ceil(3.0 / np.asarray(knee.spacing_kji)).astype(int)
    low = np.maximum(head - reach, 0)
    high = np.minimum(head + reach + 1, knee.array.shape)
    grid = np.indices(high - low).reshape(3, -1).T + low
    ball = grid[np.linalg.norm((grid - head) * knee.spacing_kji, axis=1) <= 3.0]
    ball = ball[planted[tuple(ball.T)] == 0]
    planted[tuple(ball.T)] = MEDIAL_MENISCUS
    assert len(ball) > 100
    # And a layer of lateral tibial cartilage glued onto the fibula's surface.
    # Everything within 1 mm of the fibula lies in its box widened by 5 voxels (>= 1.8 mm): the shell
    # and the distance check are computed there.
    fibula_box = tuple(slice(max(int(a.min()) - 5, 0), int(a.max()) + 6) for a in fibula.T)
    shell = ndimage.binary_dilation(knee.array[fibula_box] == FIBULA, iterations=1) & (knee.array[fibula_box] == 0)
    shell_index = np.argwhere(shell)[:300] + [b.start for b in fibula_box]
    planted[tuple(shell_index.T)] = LATERAL_TIBIAL
    cleaned = clear_fibula_contact(planted, knee.spacing_kji, 1.0)
    near = ndimage.distance_transform_edt(cleaned[fibula_box] != FIBULA, sampling=knee.spacing_kji) <= 1.0
    assert not np.isin(cleaned[fibula_box][near], SOFT).any()
    assert np.array_equal(cleaned, knee.array)


def test_specks_away_from_a_plate_are_removed_and_big_pieces_kept(knee):
    planted = knee.array.copy()
    empty = np.argwhere(knee.array == 0)
    rng = np.random.default_rng(3)
    for label in (tissue("femoral_cartilage").label, tissue("patellar_cartilage").label, MEDIAL_MENISCUS):
        k, j, i = empty[rng.integers(len(empty))]
        box = planted[k : k + 3, j : j + 3, i : i + 3]
        box[box == 0] = label
    # Cut the femoral cartilage plate in two big pieces: both must stay.
    femoral = planted == tissue("femoral_cartilage").label
    cut = int(np.median(np.nonzero(femoral)[0]))
    planted[cut : cut + 2][femoral[cut : cut + 2]] = 0
    expected = planted.copy()
    pieces, count = ndimage.label(femoral & (planted != 0), np.ones((3, 3, 3)))
    sizes = np.sort(np.bincount(pieces.ravel())[1:])[::-1]
    assert sizes[1] > 0.1 * sizes[0]  # the cut really made two large pieces
    expected[(planted != knee.array) & (knee.array == 0)] = 0  # the specks go
    assert np.array_equal(keep_major_components(planted, SOFT, 0.1), expected)


def test_real_mese_scan_has_no_soft_tissue_on_the_wrong_side_or_on_the_fibula():
    """The shipped model on the real MESE scan, with the post-processing its package records."""
    import torch

    from KneeSegLogic.io.outputs import Progress, Results
    from KneeSegLogic.pipeline.segment import segment_volume
    from KneeSegLogic.resources import BUNDLED_MODELS_DIR
    from KneeSegLogic.segmentation.package import load_package

    scan = read_volume(shared_data("mese_t2_knee_pymskt"))
    # Cropped along i (anterior-posterior here) to the knee: the shipped model labels nothing in the
    # first 35 or last 63 of the 256 columns; the 184 columns kept hold the whole joint with margin.
    assert abs(scan.direction[1, 0]) > 0.9  # i runs anterior-posterior
    scan = Volume(
        scan.array[:, :, 24:208],
        scan.spacing,
        tuple(np.asarray(scan.origin) + scan.direction[:, 0] * scan.spacing[0] * 24),
        scan.direction,
        scan.echo_times_ms,
    )
    package = load_package(BUNDLED_MODELS_DIR / "kneeseg-knee-2p5d")
    assert [step for step in package.postprocessing if step in CONSISTENCY_STEPS] == CONSISTENCY_STEPS
    labels, _, _ = segment_volume(scan, package, torch.device("cpu"), Results("segment"), Progress())
    result = labels.array
    boundary, medial_sign = medial_lateral_split(labels.with_array(result))
    for label, medial_side in ((MEDIAL_MENISCUS, True), (MEDIAL_TIBIAL, True), (LATERAL_MENISCUS, False)):
        positions = left_right_coordinates(labels, result == label)
        assert positions.size > 0
        assert np.all(((positions - boundary) * medial_sign > 0) == medial_side)
    near = ndimage.distance_transform_edt(result != FIBULA, sampling=labels.spacing_kji) <= 1.0
    assert not np.isin(result[near], SOFT).any()
