"""DICOM folders: multi-echo grouping, slice order along the normal, geometry, bad folders."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from conftest import rotation, shared_data, write_dicom_series

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.dicom import read_dicom_folder
from KneeSegLogic.io.scans import read_volume

ECHO_TIMES = (9.5, 19.0, 28.5)
SPACING = (0.7, 0.6, 3.0)
ORIGIN = (-20.0, 35.5, 12.25)


def random_pixels(shape=(6, 10, 12, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 3000, shape).astype(np.int16)


def shuffled_names(count: int, seed: int = 1) -> list[str]:
    return [f"{int(n):016x}.dcm" for n in np.random.default_rng(seed).integers(0, 2**62, count)]


@pytest.mark.parametrize("stacking", [1, -1], ids=["along-normal", "against-normal"])
def test_oblique_multi_echo_series(tmp_path, stacking):
    """Echo grouping, slice order and geometry come from the headers, not from file names."""
    pixels = random_pixels()
    orientation = rotation((0.2, 0.9, -0.3), 35.0)
    orientation[:, 2] *= stacking  # slices written along or against row x column
    write_dicom_series(tmp_path, pixels, ECHO_TIMES, SPACING, ORIGIN, orientation, names=shuffled_names(18))
    volume = read_dicom_folder(tmp_path)

    assert volume.array.shape == (6, 10, 12, 3) and volume.array.dtype == np.float32
    assert volume.echo_times_ms == ECHO_TIMES
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    # ITK's slice axis is row x column; slices come first-to-last along it.
    expected_direction = orientation * np.array([1, 1, stacking])
    np.testing.assert_allclose(volume.direction, expected_direction, atol=1e-6)
    expected = pixels if stacking == 1 else pixels[::-1]
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    first_slice = 0 if stacking == 1 else pixels.shape[0] - 1
    np.testing.assert_allclose(
        volume.origin, np.asarray(ORIGIN) + orientation[:, 2] * SPACING[2] * first_slice, atol=1e-5
    )


def test_single_echo_series_is_3d(tmp_path):
    pixels = random_pixels((5, 8, 9, 1))
    write_dicom_series(tmp_path, pixels, (12.0,))
    volume = read_volume(tmp_path)
    assert volume.array.shape == (5, 8, 9) and volume.echo_times_ms is None
    np.testing.assert_array_equal(volume.array, pixels[..., 0])


def test_echoes_stored_as_separate_series_are_one_scan(tmp_path):
    pixels = random_pixels((5, 8, 9, 2))
    write_dicom_series(tmp_path, pixels[..., :1], (10.0,), names=[f"a{k}.dcm" for k in range(5)])
    write_dicom_series(tmp_path, pixels[..., 1:], (20.0,), names=[f"b{k}.dcm" for k in range(5)])
    volume = read_dicom_folder(tmp_path)
    assert volume.echo_times_ms == (10.0, 20.0)
    np.testing.assert_array_equal(volume.array, pixels)


def _mixed_orientation(folder):
    write_dicom_series(folder, random_pixels((4, 8, 8, 1)), (10.0,), names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(
        folder,
        random_pixels((4, 8, 8, 1)),
        (10.0,),
        orientation=rotation((1, 0, 0), 90),
        names=[f"b{k}.dcm" for k in range(4)],
    )


def _repeated_series(folder):
    write_dicom_series(folder, random_pixels((4, 8, 8, 1)), (10.0,), names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(folder, random_pixels((4, 8, 8, 1), seed=3), (10.0,), names=[f"b{k}.dcm" for k in range(4)])


def _echo_time_missing(folder):
    write_dicom_series(folder, random_pixels((4, 8, 8, 2)), (10.0, None))


def _single_slice(folder):
    write_dicom_series(folder, random_pixels((1, 8, 8, 1)), (10.0,))


def _no_dicom(folder):
    folder.mkdir()
    (folder / "README.txt").write_text("not a scan")


def _missing_slice(folder):
    paths = write_dicom_series(folder, random_pixels((6, 8, 8, 1)), (10.0,))
    paths[2].unlink()


def _echo_short_of_slices(folder):
    paths = write_dicom_series(folder, random_pixels((6, 8, 8, 2)), (10.0, 20.0))
    paths[-1].unlink()


@pytest.mark.parametrize(
    "make, problem",
    [
        (_mixed_orientation, "folder mixes 2 DICOM series"),
        (_repeated_series, "folder mixes 2 DICOM series"),
        (_echo_time_missing, "echo times are missing"),
        (_single_slice, "2D image"),
        (_no_dicom, "folder holds no DICOM images"),
        (_missing_slice, "slice spacing is irregular"),
        (_echo_short_of_slices, "different numbers of slices"),
    ],
)
def test_bad_folders_name_the_folder_and_problem(tmp_path, make, problem):
    folder = tmp_path / "scan"
    make(folder)
    with pytest.raises(InputError, match=problem) as error:
        read_volume(folder)
    assert str(error.value).startswith(f"{folder}: ")
    assert "\n" not in str(error.value)


# --- the real MESE knee (../shared/data) -------------------------------------------------------

README_DIRECTION = (
    -0.02183430508768329,
    -0.14477205880584315,
    -0.9892240970126311,
    0.9995105915952667,
    0.019010007721790664,
    -0.02484344773371071,
    0.022401794799036173,
    -0.9892824018426362,
    0.14428613583517622,
)


@pytest.fixture(scope="module")
def mese():
    folder = shared_data("mese_t2_knee_pymskt")
    return folder, read_volume(folder)


def test_real_mese_matches_published_values(mese):
    """Values ../shared/data/README.md lists (from pymskt's independent loader test)."""
    _, volume = mese
    assert volume.array.shape == (24, 256, 256, 8)
    assert volume.size == (256, 256, 24)
    assert volume.echo_times_ms == pytest.approx(
        (6.312, 12.624, 18.936, 25.248, 31.56, 37.872, 44.184, 50.496), abs=1e-9
    )
    np.testing.assert_allclose(volume.spacing, (0.625, 0.625, 4.0), atol=1e-5)
    np.testing.assert_allclose(volume.origin, (-29.0364, -103.429, 56.2757), atol=1e-9)
    np.testing.assert_allclose(volume.direction.ravel(), README_DIRECTION, atol=1e-12)


def test_real_mese_voxels_match_pydicom(mese):
    """Every file's pixels sit at (its slice along the normal, its echo), read independently."""
    folder, volume = mese
    normal = volume.direction[:, 2]
    for path in sorted(folder.iterdir())[::7]:
        ds = pydicom.dcmread(path)
        echo = volume.echo_times_ms.index(float(ds.EchoTime))
        depth = (np.asarray(ds.ImagePositionPatient, float) - volume.origin) @ normal
        k = int(round(depth / volume.spacing[2]))
        np.testing.assert_array_equal(volume.array[k, :, :, echo], ds.pixel_array.astype(np.float32))


def test_real_mese_order_independent_of_file_names(mese, tmp_path):
    folder, volume = mese
    files = sorted(folder.iterdir())
    for path, name in zip(files, shuffled_names(len(files), seed=5)):
        shutil.copyfile(path, tmp_path / name)
    shuffled = read_volume(tmp_path)
    np.testing.assert_array_equal(shuffled.array, volume.array)
    assert shuffled.same_grid(volume, atol=0) and shuffled.echo_times_ms == volume.echo_times_ms


def test_one_series_chosen_by_uid_from_a_folder_of_several(tmp_path):
    folder = tmp_path / "study"
    first = random_pixels((4, 8, 8, 1))
    write_dicom_series(folder, first, (10.0,), series_uid="1.2.826.0.1.1", names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(
        folder,
        random_pixels((5, 8, 8, 1), seed=3),
        (12.0,),
        series_uid="1.2.826.0.1.2",
        names=[f"b{k}.dcm" for k in range(5)],
    )
    with pytest.raises(InputError, match=r"1\.2\.826\.0\.1\.1 \(4 files\); 1\.2\.826\.0\.1\.2 \(5 files\)"):
        read_volume(folder)
    volume = read_volume(f"{folder}::1.2.826.0.1.1")
    assert volume.array.shape == (4, 8, 8)
    np.testing.assert_array_equal(volume.array, first[..., 0])
    assert read_volume(f"{folder}::1.2.826.0.1.2").array.shape == (5, 8, 8)
