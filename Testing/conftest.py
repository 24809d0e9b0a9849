"""Shared test fixtures: where the data are, and a small oblique volume to round-trip."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from KneeSegLogic.io.volume import Volume

REPO = Path(__file__).resolve().parents[1]
# Tests live in folders that mirror the engine's subpackages; a few share module fixtures across
# folders (`from test_segment import package`), so every test folder is importable by name.
sys.path[:0] = [str(folder) for folder in sorted(Path(__file__).parent.iterdir()) if folder.is_dir() and not folder.name.startswith((".", "_"))]
SAMPLE_DATA = REPO / "Resources" / "SampleData"
# Real scans for development live beside the repository (../shared/data); a fresh clone lacks them.
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not present (development data, not shipped)")
    return path


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues), for oblique test directions."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.fixture
def oblique_labels() -> Volume:
    """A 3D label map (labels 1, 5, 6, 9) on an oblique, anisotropic grid with odd sizes."""
    rng = np.random.default_rng(7)
    array = np.zeros((13, 17, 21), np.uint8)  # (k, j, i)
    array[2:6, 3:9, 4:12] = 5
    array[6:11, 3:9, 4:12] = 6
    array[5:7, 4:8, 5:11] = 1
    array[rng.random(array.shape) > 0.97] = 9
    direction = rotation((0.3, -0.5, 0.8), 27.0) @ np.diag([1.0, -1.0, 1.0])
    return Volume(array, (0.3646, 0.4127, 0.7013), (-12.3456789, 45.678, -101.5), direction)


def write_dicom_series(
    folder: Path,
    pixels: np.ndarray,
    echo_times_ms: tuple[float | None, ...] = (None,),
    spacing: tuple[float, float, float] = (0.7, 0.6, 3.0),
    origin: tuple[float, float, float] = (-20.0, 35.5, 12.25),
    orientation: np.ndarray | None = None,
    series_uid: str | None = None,
    names: list[str] | None = None,
) -> list[Path]:
    """Write ``pixels[k, j, i, echo]`` (int16) as single-frame MR DICOM files with pydicom.

    Columns of ``orientation`` are the row, column and slice directions (LPS); file names and
    InstanceNumber are given in slice-fastest order unless ``names`` says otherwise. A ``None``
    echo time leaves EchoTime out of that echo's files.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    orientation = np.eye(3) if orientation is None else orientation
    pixels = pixels if pixels.ndim == 4 else pixels[..., None]
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for echo, echo_time in enumerate(echo_times_ms):
        for k in range(pixels.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.Modality, ds.PatientName, ds.PatientID = "MR", "Test^Phantom", "0"
            ds.InstanceNumber = 1 + len(paths)
            ds.EchoNumbers = echo + 1
            if echo_time is not None:
                ds.EchoTime = echo_time
            position = np.asarray(origin) + orientation[:, 2] * spacing[2] * k
            ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation[:, :2].T.ravel()]
            ds.PixelSpacing = [spacing[1], spacing[0]]  # DICOM order: row spacing (j), column spacing (i)
            ds.SliceThickness = spacing[2]
            ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = np.ascontiguousarray(pixels[k, :, :, echo], dtype="<i2").tobytes()
            path = folder / (names[len(paths)] if names else f"IM{len(paths) + 1:04d}.dcm")
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
