"""Synthetic MESE phantom: true T2 per tissue, signal decay, Rician noise level, geometry."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_DATA

from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_LABEL
from KneeSegLogic.training.phantom import (
    DEFAULT_ECHO_TIMES_MS,
    TISSUE_PROPERTIES,
    synthesize_mese,
)


@pytest.fixture(scope="module")
def labels() -> Volume:
    """The real bundled knee label map, every 4th voxel in-plane and 2nd slice (80x96x96)."""
    full = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    sx, sy, sz = full.spacing
    return Volume(np.ascontiguousarray(full.array[::2, ::4, ::4]), (4 * sx, 4 * sy, 2 * sz), full.origin, full.direction)


@pytest.fixture(scope="module")
def phantom(labels):
    return synthesize_mese(labels, snr=40.0, seed=3)


@pytest.fixture(scope="module")
def clean(labels):
    """Nearly noise-free (SNR 2000): means follow the signal model without Rician bias."""
    return synthesize_mese(labels, snr=2000.0, seed=0)


def test_true_t2_and_proton_density_follow_the_table(labels, phantom):
    bone_cortex_t2 = TISSUE_PROPERTIES["cortex"][1]
    for label, tissue in BY_LABEL.items():
        mask = labels.array == label
        assert mask.any(), tissue.name
        pd, t2 = TISSUE_PROPERTIES[tissue.key]
        if tissue.group == "bone":  # marrow inside, a dark cortical rim outside
            values, counts = np.unique(phantom.t2_ms[mask], return_counts=True)
            assert values.tolist() == [bone_cortex_t2, t2] and counts[1] > counts[0]
            mask &= phantom.t2_ms == t2
        else:
            assert np.all(phantom.t2_ms[mask] == t2), tissue.name
        np.testing.assert_allclose(phantom.proton_density[mask], pd * 1000.0, rtol=1e-6)
    # Joint fluid touches cartilage; air far from the knee has no signal.
    assert np.count_nonzero(phantom.t2_ms == TISSUE_PROPERTIES["fluid"][1]) > 0
    assert phantom.t2_ms[0, 0, 0] == 0 and phantom.proton_density[0, 0, 0] == 0


def test_image_on_label_grid_with_echo_times(labels, phantom):
    image = phantom.image
    assert image.array.shape == labels.array.shape + (len(DEFAULT_ECHO_TIMES_MS),)
    assert image.array.dtype == np.float32 and image.echo_times_ms == DEFAULT_ECHO_TIMES_MS
    assert image.same_grid(labels, atol=0)


def test_noise_sigma_recovered_from_background(phantom):
    """Air is pure Rician noise of zero signal: Rayleigh, mean sigma*sqrt(pi/2)."""
    air = phantom.image.array[phantom.t2_ms == 0]
    assert air.size > 1_000_000
    sigma_from_mean = air.mean() / np.sqrt(np.pi / 2)
    sigma_from_rms = np.sqrt(np.mean(air.astype(np.float64) ** 2) / 2)
    assert phantom.sigma == pytest.approx(25.0)  # scale 1000 / SNR 40
    assert sigma_from_mean == pytest.approx(phantom.sigma, rel=0.01)
    assert sigma_from_rms == pytest.approx(phantom.sigma, rel=0.01)


def test_signal_decays_with_the_true_t2(labels, clean):
    """At high SNR the mean signal of each tissue is PD * exp(-TE/T2); a log-linear fit finds T2."""
    te = np.asarray(DEFAULT_ECHO_TIMES_MS)
    for label in (1, 2, 9, 10):  # femoral and medial tibial cartilage, both menisci
        key = BY_LABEL[label].key
        pd, t2 = TISSUE_PROPERTIES[key]
        mean_signal = clean.image.array[labels.array == label].mean(axis=0)
        np.testing.assert_allclose(mean_signal, 1000 * pd * np.exp(-te / t2), rtol=0.01, atol=1.0)
        slope = np.polyfit(te, np.log(mean_signal), 1)[0]
        assert -1 / slope == pytest.approx(t2, rel=0.01), key


def test_first_echo_factor_and_seed(labels, clean):
    bright = synthesize_mese(labels, snr=2000.0, first_echo_factor=1.3, seed=0)
    cartilage = labels.array == 1
    ratio = bright.image.array[cartilage].mean(axis=0) / clean.image.array[cartilage].mean(axis=0)
    assert ratio[0] == pytest.approx(1.3, rel=0.005)
    np.testing.assert_allclose(ratio[1:], 1.0, rtol=1e-6)  # same seed: identical later echoes
    corner = Volume(np.ascontiguousarray(labels.array[:20, :24, :24]), labels.spacing, labels.origin, labels.direction)
    first, again, other = (synthesize_mese(corner, seed=s).image.array for s in (5, 5, 6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
