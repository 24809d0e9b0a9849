"""Volume I/O with exact geometry; reorientation and resampling round trips; real label map."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_DATA, shared_data

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import (
    Volume,
    orientation_code,
    reorient,
    resample_to_spacing,
)

ECHO_TIMES = (8.0, 16.0, 24.0, 32.0)
# Geometry tolerances per writer. NRRD keeps float64 spacing x direction per axis (split back
# into spacing and direction to within float64 rounding); MHA keeps spacing and direction apart
# (bit exact); NIfTI keeps its affine in float32, so errors are float32 rounding: about 1e-7
# relative, i.e. < 1e-5 mm for origins ~100 mm.
TOLERANCE = {
    ".nrrd": dict(spacing=1e-12, origin=1e-12, direction=1e-12),
    ".mha": dict(spacing=0.0, origin=0.0, direction=0.0),
    ".nii": dict(spacing=1e-6, origin=1e-5, direction=1e-6),
    ".nii.gz": dict(spacing=1e-6, origin=1e-5, direction=1e-6),
}


def assert_geometry(a: Volume, b: Volume, spacing: float, origin: float, direction: float) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=spacing)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=origin)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=direction)


@pytest.fixture
def oblique_image(oblique_labels) -> Volume:
    rng = np.random.default_rng(3)
    return oblique_labels.with_array(rng.normal(100, 30, oblique_labels.array.shape).astype(np.float32))


@pytest.mark.parametrize("suffix", list(TOLERANCE))
@pytest.mark.parametrize("kind", ["labels", "image", "multi-echo"])
def test_every_writer_round_trips_oblique_volume(tmp_path, suffix, kind, oblique_labels, oblique_image):
    volume = {
        "labels": oblique_labels,
        "image": oblique_image,
        "multi-echo": oblique_image.with_array(
            np.stack([oblique_image.array * np.exp(-t / 30) for t in ECHO_TIMES], axis=-1), ECHO_TIMES
        ),
    }[kind]
    path = write_volume(volume, tmp_path / f"v{suffix}")
    # NIfTI has no place for echo times: the caller gives them, as on the command line.
    given = ECHO_TIMES if kind == "multi-echo" and suffix.startswith(".nii") else None
    back = read_volume(path, given)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.echo_times_ms == volume.echo_times_ms
    assert_geometry(back, volume, **TOLERANCE[suffix])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # atomic: no temporary left


def test_nifti_multi_echo_needs_echo_times(tmp_path, oblique_image):
    four_d = oblique_image.with_array(np.stack([oblique_image.array] * 3, axis=-1), (10, 20, 30))
    path = write_volume(four_d, tmp_path / "me.nii.gz")
    with pytest.raises(InputError, match="holds 3 echoes but no echo times"):
        read_volume(path)
    with pytest.raises(InputError, match=r"echo times are not increasing: \[30.0, 20.0, 10.0\] ms"):
        read_volume(path, (30, 20, 10))
    with pytest.raises(InputError, match="holds 3 echoes but 2 echo times were given"):
        read_volume(path, (10, 20))


@pytest.mark.parametrize("permute", [False, True], ids=["flips", "axes-permuted"])
def test_reorient_to_lps_and_back_is_exact(oblique_image, permute):
    if permute:  # a sagittal-like grid: slice axis left-right, as in OAI scans
        oblique_image = Volume(oblique_image.array, oblique_image.spacing, oblique_image.origin,
                               oblique_image.direction[:, [2, 0, 1]])
    code = orientation_code(oblique_image)
    lps = reorient(oblique_image, "LPS")
    assert code != "LPS" and orientation_code(lps) == "LPS"
    assert lps.array.shape != oblique_image.array.shape if permute else not np.array_equal(lps.array, oblique_image.array)
    back = reorient(lps, code)
    np.testing.assert_array_equal(back.array, oblique_image.array)
    assert_geometry(back, oblique_image, 1e-12, 1e-12, 1e-12)
    # Every voxel keeps its physical position: compare one voxel's centre in both grids.
    index = np.array([3, 5, 7, 1.0])  # (i, j, k) in the original
    point = oblique_image.index_to_physical() @ index
    lps_index = np.linalg.solve(lps.index_to_physical(), point)[:3]
    i, j, k = np.round(lps_index).astype(int)
    np.testing.assert_allclose(lps_index, (i, j, k), atol=1e-9)
    assert lps.array[k, j, i] == oblique_image.array[7, 5, 3]


def test_resample_labels_to_half_spacing_and_back_is_exact(oblique_labels):
    fine = resample_to_spacing(oblique_labels, np.asarray(oblique_labels.spacing) / 2, is_label=True)
    assert fine.size == tuple(2 * s for s in oblique_labels.size)
    back = resample_to_spacing(fine, oblique_labels.spacing, is_label=True)
    assert_geometry(back, oblique_labels, 1e-12, 1e-9, 1e-12)
    np.testing.assert_array_equal(back.array, oblique_labels.array)
    # Volume of each structure doubles in voxel count 8x at half spacing.
    for label in (1, 5, 6):
        assert np.count_nonzero(fine.array == label) == 8 * np.count_nonzero(oblique_labels.array == label)


def test_resample_smooth_image_to_half_spacing_and_back_is_close(oblique_labels):
    k, j, i = np.meshgrid(*[np.arange(n) for n in oblique_labels.array.shape], indexing="ij")
    smooth = 100 + 40 * np.sin(i / 4.0) * np.cos(j / 5.0) + 10 * k / 13
    image = oblique_labels.with_array(smooth.astype(np.float32))
    back = resample_to_spacing(resample_to_spacing(image, np.asarray(image.spacing) / 2), image.spacing)
    interior = (slice(2, -2),) * 3  # B-spline is exact only where it sees enough neighbours
    error = np.abs(back.array[interior] - image.array[interior])
    assert error.max() < 0.5  # of a 100 +- 50 signal
    assert error.mean() < 0.05


def test_bad_volumes(tmp_path):
    nan = np.ones((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    cases = {
        "nan.nrrd": (Volume(nan, (1, 1, 1)), "volume contains 1 NaN or infinite voxels"),
        # ITK's NIfTI reader turns NaN into 0; the file is checked itself.
        "nan.nii.gz": (Volume(nan, (1, 1, 1)), "volume contains 1 NaN or infinite voxels"),
        "zero.nrrd": (Volume(np.zeros((4, 5, 6), np.int16), (1, 1, 1)), r"volume is empty"),
        "flat.nrrd": (Volume(np.ones((1, 5, 6), np.int16), (1, 1, 1)), "is a 2D image"),
    }
    for name, (volume, problem) in cases.items():
        write_volume(volume, tmp_path / name)
        with pytest.raises(InputError, match=f"{name}: {problem}"):
            read_volume(tmp_path / name)
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="garbage.nii.gz: cannot be read as an image"):
        read_volume(tmp_path / "garbage.nii.gz")
    with pytest.raises(InputError, match="absent.nrrd: no such file"):
        read_volume(tmp_path / "absent.nrrd")


def test_bundled_mese_sample_is_the_reduced_real_scan():
    """The shipped sample keeps the real scan's echo times and geometry at 2x in-plane spacing."""
    volume = read_volume(SAMPLE_DATA / "mese_t2_knee.nrrd")
    assert volume.array.shape == (24, 128, 128, 8)
    assert volume.echo_times_ms == pytest.approx((6.312, 12.624, 18.936, 25.248, 31.56, 37.872, 44.184, 50.496))
    np.testing.assert_allclose(volume.spacing, (1.25, 1.25, 4.0), atol=1e-5)
    # The echo train decays in tissue: the brightest 10 % of echo 2 darken at every later echo.
    bright = volume.array[..., 1] > np.percentile(volume.array[..., 1], 90)
    means = volume.array[bright][:, 1:].mean(axis=0)
    assert np.all(np.diff(means) < 0) and means[-1] < 0.8 * means[0]


@pytest.mark.parametrize(
    "path",
    [
        SAMPLE_DATA / "knee_labels.nrrd",
        "knee_labels_pymskt/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd",
    ],
    ids=["bundled", "shared"],
)
def test_pymskt_label_map(path):
    path = path if not isinstance(path, str) else shared_data(path)
    labels = read_volume(path)
    assert labels.array.dtype == np.uint8
    assert labels.size == (384, 384, 160)
    np.testing.assert_allclose(labels.spacing, (0.3646, 0.3646, 0.7), atol=1e-4)
    np.testing.assert_array_equal(np.unique(labels.array), np.arange(11))
    assert orientation_code(labels)[2] in "LR"  # sagittal: slices step left-right
