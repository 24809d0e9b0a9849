"""Random-contrast synthesis: shapes, label values, geometry of the sampling grid, contrast
variation, alignment of labels with image structure, mirroring, thick slices, real-image pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from KneeSegLogic.io.volume import Volume, orientation_code, reorient
from KneeSegLogic.segmentation.normalisation import (
    CANONICAL_ORIENTATION,
    normalise_intensity,
)
from KneeSegLogic.tissues import TISSUES
from KneeSegLogic.training.synthesis import (
    Anatomy,
    AnatomySettings,
    SynthesisSettings,
    Synthesizer,
    _thick_slices,
    joint_fluid_film,
)

torch.set_num_threads(1)

# LPS directions of the i, j, k axes pointing P, I, R: the canonical frame itself, so the
# anatomy's canonical array is the array we build (d = k, h = j, w = i).
PIR_DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
BONE = 5  # femur: marrow intensity with a cortex rim
SHAPE = (24, 48, 48)
BALL_CENTRE = (9, 24, 20)  # voxels (d, h, w); off the box centre used below along d and w
BALL_RADII = (6, 10, 8)

RIGID = SynthesisSettings(
    rotation_deg=0.0,
    scale_range=(1.0, 1.0),
    elastic_mm=0.0,
    mirror_probability=0.0,
    fov_crop_probability=0.0,
    anatomy=AnatomySettings(probability=0.0),
)


def ellipsoid_labels() -> np.ndarray:
    d, h, w = np.indices(SHAPE)
    inside = sum(((x - c) / r) ** 2 for x, c, r in zip((d, h, w), BALL_CENTRE, BALL_RADII)) <= 1
    return np.where(inside, BONE, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def ball() -> Volume:
    return Volume(ellipsoid_labels(), (1.0, 1.0, 1.0), (3.0, -2.0, 7.0), PIR_DIRECTION)


@pytest.fixture(scope="module")
def ball_anatomy(ball: Volume) -> Anatomy:
    return Anatomy.from_volume(ball)


def test_fixture_is_already_canonical(ball: Volume) -> None:
    assert orientation_code(ball) == CANONICAL_ORIENTATION
    np.testing.assert_array_equal(reorient(ball, CANONICAL_ORIENTATION).array, ball.array)


def test_samples_have_requested_shape_valid_labels_and_bounded_finite_image(ball_anatomy: Anatomy) -> None:
    synthesizer = Synthesizer([ball_anatomy], (8, 32, 32), (1.5, 1.0, 1.0), seed=1)
    valid = {0} | {t.label for t in TISSUES}
    for _ in range(4):
        image, labels = synthesizer.sample()
        assert image.shape == labels.shape == (8, 32, 32)
        assert image.dtype == torch.float32 and labels.dtype == torch.int64
        assert set(labels.unique().tolist()) <= valid
        assert torch.isfinite(image).all()
        assert image.min() >= -0.2 and image.max() <= 1.5


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.0, 2.0)])
def test_rigid_grid_puts_labels_where_geometry_says(ball_anatomy: Anatomy, spacing: tuple) -> None:
    # Box voxel (d, h, w) samples anatomy index centre + (index - (n - 1) / 2) * box / anatomy
    # spacing: with odd box sizes these are whole voxels, so nearest sampling is exact.
    box = (9, 15, 15) if spacing[1] == 2.0 else (9, 31, 31)
    centre = np.array([12, 24, 24])
    synthesizer = Synthesizer([ball_anatomy], box, spacing, RIGID, seed=0)
    _, labels = synthesizer.sample(centre=centre.astype(float))
    steps = np.asarray(spacing).astype(int)
    index = [c + (np.arange(n) - (n - 1) // 2) * s for c, n, s in zip(centre, box, steps)]
    expected = ellipsoid_labels()[np.ix_(*index)]
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert labels[4, box[1] // 2, box[2] // 2] == BONE  # (12, 24, 24) lies inside the ball
    assert labels[0, 0, 0] == 0


def test_images_vary_in_contrast_and_follow_the_labels(ball_anatomy: Anatomy) -> None:
    synthesizer = Synthesizer([ball_anatomy], (9, 31, 31), (1.0, 1.0, 1.0), RIGID, seed=3)
    contrasts, explained, explained_misaligned = [], [], []

    def explained_variance(image: torch.Tensor, mask: torch.Tensor) -> float:
        # Fraction of the image variance the inside/outside split explains (eta squared).
        within = image[mask].var() * mask.sum() + image[~mask].var() * (~mask).sum()
        return float(1 - within / (image.var() * image.numel()))

    for _ in range(30):
        image, labels = synthesizer.sample(centre=np.array([12.0, 24.0, 24.0]))
        inside = labels == BONE
        contrasts.append(float(image[inside].mean() - image[~inside].mean()))
        explained.append(explained_variance(image, inside))
        explained_misaligned.append(explained_variance(image, inside.flip(2)))
    # Random contrasts: the bone is brighter than its surroundings in some samples, darker in others.
    assert max(contrasts) > 0.1 and min(contrasts) < -0.1
    # Labels sit on the image structure: the labelled ball explains much more of the image than
    # the same ball mirrored onto the wrong place (marrow is heterogeneous, so not all of it).
    assert np.mean(explained) > 0.15
    assert np.mean(explained) > 4 * np.mean(explained_misaligned)


def test_mirroring_flips_left_right(ball_anatomy: Anatomy) -> None:
    centre = np.array([12.0, 24.0, 24.0])
    plain = Synthesizer([ball_anatomy], (9, 31, 31), (1.0, 1.0, 1.0), RIGID, seed=5)
    mirrored = Synthesizer(
        [ball_anatomy],
        (9, 31, 31),
        (1.0, 1.0, 1.0),
        SynthesisSettings(**{**RIGID.__dict__, "mirror_probability": 1.0}),
        seed=5,
    )
    _, labels = plain.sample(centre=centre)
    _, labels_mirrored = mirrored.sample(centre=centre)
    assert not torch.equal(labels, labels_mirrored)  # the ball is off-centre along d
    assert torch.equal(labels_mirrored, labels.flip(0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slices_blur_along_their_axis_only(axis: int) -> None:
    generator = torch.Generator().manual_seed(axis)
    for varying in range(3):
        # A profile varying along one axis only, constant along the others.
        profile = torch.rand(16, generator=generator)
        shape = [1, 1, 1]
        shape[varying] = 16
        image = profile.reshape(shape).expand(16, 16, 16).contiguous()
        thick = _thick_slices(image, axis, 4.0)
        assert thick.shape == image.shape
        if varying == axis:
            # Averaging 4 slices: the slice-to-slice changes shrink a lot.
            assert thick.diff(dim=axis).abs().mean() < 0.5 * image.diff(dim=axis).abs().mean()
        else:
            torch.testing.assert_close(thick, image)


def test_synthesizer_thick_slice_axis_smooths_that_axis(ball_anatomy: Anatomy) -> None:
    def roughness(thick_axis: int) -> np.ndarray:
        settings = SynthesisSettings(
            **{
                **RIGID.__dict__,
                "thick_slice_probability": 1.0,
                "thick_slice_axis": thick_axis,
                "thick_slice_mm": (5.0, 5.0),
                "noise_range": (0.0, 0.0),
                "blur_px": (0.0, 0.0),
            }
        )
        synthesizer = Synthesizer([ball_anatomy], (9, 31, 31), (1.0, 1.0, 1.0), settings, seed=11)
        images = [synthesizer.sample(centre=np.array([12.0, 24.0, 24.0]))[0] for _ in range(3)]
        return np.array([np.mean([float(im.diff(dim=a).abs().mean()) for im in images]) for a in (1, 2)])

    along_h, along_w = roughness(1), roughness(2)
    assert along_h[0] < 0.6 * along_w[0]  # 5 mm slices along h: smooth along h ...
    assert along_w[1] < 0.6 * along_h[1]  # ... and along w when the slices are along w


def smooth_pattern(shape: tuple[int, ...], seed: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.5).astype(np.float32)


def test_pair_image_follows_its_labels_through_reorientation() -> None:
    # An LPS-ordered (non-canonical) grid: from_pair must permute/flip image and labels alike.
    lps_labels = np.transpose(ellipsoid_labels(), (1, 2, 0))[::-1, ::-1]  # some other axis order
    labels = Volume(np.ascontiguousarray(lps_labels), (0.8, 1.0, 1.2), (10.0, 20.0, -5.0))
    image = labels.with_array(100 + 40 * (lps_labels == BONE) + 5 * smooth_pattern(lps_labels.shape, 0))
    anatomy = Anatomy.from_pair(image, labels)
    assert anatomy.image is not None and anatomy.image.shape == anatomy.labels.shape
    inside = anatomy.labels == BONE
    assert float(anatomy.image[inside].mean()) > float(anatomy.image[~inside].mean()) + 0.5
    assert float(anatomy.image.min()) >= 0


def test_pair_rejects_an_image_on_another_grid(ball: Volume) -> None:
    image = Volume(np.zeros(SHAPE, np.float32), (1.0, 1.0, 2.0), ball.origin, ball.direction)
    with pytest.raises(ValueError, match="grid"):
        Anatomy.from_pair(image, ball)


def test_pair_samples_show_the_real_intensities(ball: Volume) -> None:
    # The image is a smooth pattern unrelated to the labels: only the real-image path can
    # reproduce it, so correlation with the anatomy's image tells the two paths apart.
    image = ball.with_array(smooth_pattern(SHAPE, 1))
    anatomy = Anatomy.from_pair(image, ball)
    centre = np.array([12, 24, 24])
    expected = anatomy.image[0, 0, 8:17, 9:40, 9:40].numpy().ravel()

    def correlations(probability: float) -> list[float]:
        settings = SynthesisSettings(**{**RIGID.__dict__, "real_image_probability": probability})
        synthesizer = Synthesizer([anatomy], (9, 31, 31), (1.0, 1.0, 1.0), settings, seed=2)
        return [
            float(np.corrcoef(synthesizer.sample(centre=centre.astype(float))[0].numpy().ravel(), expected)[0, 1])
            for _ in range(4)
        ]

    real, synthetic = correlations(1.0), correlations(0.0)
    # Bias field, gamma, noise and thick slices still change the real image (r 0.7-0.98 measured).
    assert min(real) > 0.6
    assert max(np.abs(synthetic)) < 0.35


def test_label_only_anatomies_ignore_the_real_image_setting(ball_anatomy: Anatomy) -> None:
    # Without a real image the setting draws no random number: samples are unchanged.
    a = Synthesizer([ball_anatomy], (8, 32, 32), (1.5, 1.0, 1.0), SynthesisSettings(real_image_probability=0.0), seed=4)
    b = Synthesizer([ball_anatomy], (8, 32, 32), (1.5, 1.0, 1.0), SynthesisSettings(real_image_probability=1.0), seed=4)
    for _ in range(2):
        (image_a, labels_a), (image_b, labels_b) = a.sample(), b.sample()
        assert torch.equal(image_a, image_b) and torch.equal(labels_a, labels_b)


def test_normalise_intensity_maps_percentiles_to_unit_range() -> None:
    values = np.linspace(0, 1000, 10_001, dtype=np.float32)
    result = normalise_intensity(values)
    assert isinstance(result, np.ndarray)
    assert result[100] == pytest.approx(0.0, abs=1e-3) and result[9900] == pytest.approx(1.0, abs=1e-3)
    assert result.min() == pytest.approx(-10 / 980, abs=1e-3)  # 0 lies 10 below the 1st percentile
    torch.testing.assert_close(normalise_intensity(torch.from_numpy(values)), torch.from_numpy(result))


def test_mese_echo_augmentation_draws_echoes_20_60_20_with_physical_contrast():
    """Thomas et al.'s echo augmentation: echo 1/2/3 at 20/60/20 %, signal PD * exp(-TE/T2)."""
    from KneeSegLogic.io.volume import Volume
    from KneeSegLogic.training.synthesis import GROUPS, MESE_PROPERTIES

    labels = Volume(np.zeros((4, 8, 8), np.uint8), (1.0, 1.0, 1.0))
    labels.array[1:3, 2:6, 2:6] = 5
    synthesizer = Synthesizer([Anatomy.from_volume(labels)], (2, 4, 4), (1.0, 1.0, 1.0), seed=3)
    ratios = []
    for _ in range(400):
        values = synthesizer._mese_echo()
        assert values.max() == pytest.approx(1.0)
        cartilage, meniscus = values[GROUPS.index("cartilage")], values[GROUPS.index("meniscus")]
        ratios.append(cartilage / meniscus)
    # cartilage/meniscus = (PD_c/PD_m) exp(TE (1/T2_m - 1/T2_c)): TE = ratio's log / rate.
    pd_c, t2_c = MESE_PROPERTIES["cartilage"]
    pd_m, t2_m = MESE_PROPERTIES["meniscus"]
    echo_times = np.log(np.asarray(ratios) * pd_m / pd_c) / (1 / t2_m - 1 / t2_c)
    echo = np.select([echo_times < 12.5, echo_times < 24.5], [1, 2], 3)
    assert np.all((echo_times > 7.9) & (echo_times < 36.1))
    fractions = np.bincount(echo, minlength=4)[1:] / len(echo)
    np.testing.assert_allclose(fractions, [0.2, 0.6, 0.2], atol=0.06)


def test_label_maps_continue_their_cut_bones_beyond_the_map_and_real_pairs_do_not() -> None:
    # A bone shaft along h cut by the map's first row: a box reaching 10 voxels beyond that edge
    # sees the shaft run on (border replication), as a real scan shows it; a real pair cannot be
    # extended, so there the part beyond the map is blank background.
    array = np.zeros(SHAPE, np.uint8)
    array[8:16, :30, 20:28] = BONE
    shaft = Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), PIR_DIRECTION)
    centre = np.array([12.0, 5.0, 24.0])  # box rows -10..20 of the map: 10 rows lie beyond its edge
    _, labels = Synthesizer([Anatomy.from_volume(shaft)], (9, 31, 31), (1.0, 1.0, 1.0), RIGID, seed=0).sample(
        centre=centre
    )
    beyond, inside = labels[:, :10], labels[:, 10:25]
    np.testing.assert_array_equal(beyond.numpy(), np.broadcast_to(inside[:, :1].numpy(), beyond.shape))
    assert (beyond == BONE).sum() == 10 * 8 * 8
    pair = Anatomy.from_pair(shaft.with_array(smooth_pattern(SHAPE, 5)), shaft)
    image, labels = Synthesizer([pair], (9, 31, 31), (1.0, 1.0, 1.0), RIGID, seed=0).sample(centre=centre)
    assert (labels[:, :10] == 0).all() and (labels[:, 10:25] == BONE).sum() == 15 * 8 * 8


def _plate_on_bone() -> torch.Tensor:
    """A box of labels: femur below row 10, femoral cartilage rows 10-13 on it, background above;
    a lateral meniscus block elsewhere on the bone (a second soft structure)."""
    labels = torch.zeros((6, 20, 20), dtype=torch.long)
    labels[:, :10] = 5  # femur
    labels[:, 10:14, :10] = 1  # femoral cartilage, 4 voxels thick
    labels[:, 10:13, 14:18] = 9  # lateral meniscus
    return labels


def _thickness_synthesizer(thinning: float, thickening: float, spacing=(3.0, 0.5, 0.5)) -> Synthesizer:
    anatomy = AnatomySettings(soft_tissue_thinning=thinning, soft_tissue_thickening=thickening)
    return Synthesizer([], (6, 20, 20), spacing, SynthesisSettings(anatomy=anatomy), seed=3)


def test_thinning_removes_the_free_side_of_soft_tissue_and_leaves_the_bone_side() -> None:
    labels, vacated = _thickness_synthesizer(1.0, 0.0)._soft_tissue_thickness(_plate_on_bone())
    cartilage = labels[:, :, :10] == 1
    # Row 13 (the articular surface) is gone; rows 10-12 stay on the bone; column 9 of the plate
    # touched background on its side and went too.
    assert cartilage[:, 10:13, :9].all() and not cartilage[:, 13].any() and not cartilage[:, :, 9].any()
    assert (labels == 5).sum() == 6 * 10 * 20  # no bone voxel changed
    # Thinned voxels are background in the labels and marked for the fluid intensity.
    assert torch.equal(vacated, (_plate_on_bone() > 0) & (labels == 0))
    # The meniscus lost its top row and both side columns: 2 x 2 voxels left per slice.
    assert (labels == 9).sum() == 6 * 2 * 2
    # Nothing moved along the 3 mm slice axis (coarser than soft_tissue_max_step_mm).
    assert torch.equal(labels[0], labels[3])


def test_thickening_grows_soft_tissue_into_background_only() -> None:
    before = _plate_on_bone()
    labels, vacated = _thickness_synthesizer(0.0, 1.0)._soft_tissue_thickness(before.clone())
    assert not vacated.any()
    assert (labels == 5).sum() == (before == 5).sum()  # bone never taken
    grown = (labels == 1) & (before == 0)
    # One more row on top of the plate (row 14) and one column beside it (column 10).
    assert grown[:, 14, :10].all() and grown[:, 10:14, 10].all()
    assert int(grown.sum()) == 6 * (10 + 4)


def test_held_out_scans_are_not_thickness_augmented(ball_anatomy: Anatomy) -> None:
    # Held-out and calibration scans switch anatomy augmentation off; the thickness draws live in
    # its branch, so those scans (and their random streams) are what they were.
    settings = SynthesisSettings(anatomy=AnatomySettings(probability=0.0, soft_tissue_thinning=1.0))
    plain = SynthesisSettings(anatomy=AnatomySettings(probability=0.0, soft_tissue_thinning=0.0))
    first = Synthesizer([ball_anatomy], (16, 32, 32), (1.0, 1.0, 1.0), settings, seed=5).sample()
    second = Synthesizer([ball_anatomy], (16, 32, 32), (1.0, 1.0, 1.0), plain, seed=5).sample()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_joint_fluid_lies_against_cartilage_and_menisci_not_around_bone_shafts() -> None:
    """A femur-like bar with a cartilage cap at one end: the film (1 mm, on 0.5 mm voxels) covers
    the unlabelled voxels within 1 mm of the cartilage and nothing along the bar's far shaft."""
    from scipy import ndimage

    labels = torch.zeros((20, 60, 20), dtype=torch.long)
    labels[6:14, 10:50, 6:14] = BONE  # the shaft runs along h
    labels[6:14, 50:53, 6:14] = 3  # a cartilage cap (femoral cartilage) on its end
    spacing = np.array([0.5, 0.5, 0.5])
    film = joint_fluid_film(labels, spacing, 1.0)
    assert not film[labels > 0].any()
    cap = labels.numpy() == 3
    within = (ndimage.distance_transform_edt(~cap, sampling=spacing) <= 1.0) & (labels.numpy() == 0)
    np.testing.assert_array_equal(film.numpy(), within)
    assert film[:, 53:55].any()  # beyond the cap
    assert not film[:, 10:45].any()  # along the shaft, away from the cap
    assert not joint_fluid_film(torch.where(labels == 3, 0, labels), spacing, 1.0).any()


def test_cortex_intensity_only_on_bone_labels(monkeypatch) -> None:
    """Bone depth is sampled bilinearly, so it is above 0 up to a voxel outside the bone; the dark
    cortex must still stop at the bone's label. Here depth reaches a voxel beyond the ball, the
    cortex is exactly 0 and every other tissue brighter; the distance from the structures is given
    as far below 0, so the whole box is body (no air, fat shell or fluid pockets)."""
    from scipy import ndimage

    ball_anatomy = Anatomy.from_volume(Volume(ellipsoid_labels(), (1.0, 1.0, 1.0), (3.0, -2.0, 7.0), PIR_DIRECTION))
    synthesizer = Synthesizer([ball_anatomy], (9, 31, 31), (1.0, 1.0, 1.0), RIGID, seed=4)
    levels = {"cartilage": 0.5, "marrow": 0.8, "cortex": 0.0, "meniscus": 0.3, "fluid": 0.9, "muscle": 0.4, "fat": 0.6}
    monkeypatch.setattr(synthesizer, "_intensities", lambda: dict(levels))
    d, h, w = np.indices((9, 31, 31))
    ball = (d - 4) ** 2 + (h - 15) ** 2 + (w - 15) ** 2 <= 36
    # Depth below the surface (its outer voxels 0.5 mm deep) and 0.25 mm on the voxels just outside.
    shell = ndimage.binary_dilation(ball) & ~ball
    depth = np.where(ball, ndimage.distance_transform_edt(ball) - 0.5, np.where(shell, 0.25, 0.0))
    labels = torch.from_numpy(np.where(ball, BONE, 0))
    for _ in range(5):
        image = synthesizer._synthetic_image(labels, torch.full(ball.shape, -1e3), torch.from_numpy(depth).float())
        dark = (image == 0).numpy()
        assert dark.any()
        assert not (dark & ~ball).any(), int((dark & ~ball).sum())
