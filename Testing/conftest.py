"""Shared test fixtures: where the data are, and a small oblique volume to round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from KneeSegLogic.volume import Volume

REPO = Path(__file__).resolve().parents[1]
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
