"""T2 fitting against known answers: synthetic Rician decays, the knee phantom and the real MESE scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DATA, shared_data
from scipy.special import i0e, i1e

from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.relaxometry import (
    FLAG_CONVERGED,
    FLAG_FITTED,
    FLAG_LOW_R2,
    FLAG_OUT_OF_BOUNDS,
    _noise_floor_table,
    estimate_noise_sigma,
    expected_magnitude,
    fit_t2,
    fit_t2_volume,
    t2_volumes,
)
from KneeSegLogic.training.phantom import DEFAULT_ECHO_TIMES_MS, rician, synthesize_mese

torch.set_num_threads(1)

TE = np.asarray(DEFAULT_ECHO_TIMES_MS)  # 10..70 ms, 7 echoes


def decays(t2_ms: np.ndarray, s0: float | np.ndarray = 1000.0, te: np.ndarray = TE) -> np.ndarray:
    return np.asarray(s0)[..., None] * np.exp(-te / np.asarray(t2_ms)[..., None])


def rician_mean(amplitude: np.ndarray, sigma: float) -> np.ndarray:
    """Closed-form mean of a Rician magnitude (Bessel form), independent of the table."""
    x = amplitude**2 / (4 * sigma**2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + 2 * x) * i0e(x) + 2 * x * i1e(x))


# --- the noise-corrected model -----------------------------------------------------------------


def test_expected_magnitude_is_the_rician_mean_with_its_derivative():
    sigma = 7.0
    amplitude = sigma * np.concatenate([[0.0], np.logspace(-3, 3, 400)])
    table = torch.as_tensor(_noise_floor_table(1), dtype=torch.float64)
    value, derivative = expected_magnitude(torch.as_tensor(amplitude), torch.tensor(sigma, dtype=torch.float64), table)
    assert np.max(np.abs(value.numpy() - rician_mean(amplitude, sigma))) < 1e-6 * sigma
    step = 1e-4 * sigma
    numeric = (rician_mean(amplitude + step, sigma) - rician_mean(np.maximum(amplitude - step, 0), sigma)) / (
        amplitude + step - np.maximum(amplitude - step, 0)
    )
    assert np.max(np.abs(derivative.numpy() - numeric)) < 2e-3
    # Far above the noise the correction vanishes; at zero signal it is the Rayleigh mean.
    assert value[-1].item() == pytest.approx(amplitude[-1], rel=1e-6)
    assert value[0].item() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=1e-6)


def test_expected_magnitude_on_two_channels_matches_simulation():
    rng = np.random.default_rng(5)
    sigma, samples = 3.0, 400_000
    amplitude = np.array([0.0, 3.0, 9.0, 30.0])
    noise = rng.normal(0, sigma, (4, samples, 4))
    noise[..., 0] += amplitude[:, None]
    magnitude = np.sqrt((noise**2).sum(-1))  # sum of squares over 2 channels x (real, imaginary)
    table = torch.as_tensor(_noise_floor_table(2), dtype=torch.float64)
    value, _ = expected_magnitude(torch.as_tensor(amplitude), torch.tensor(sigma, dtype=torch.float64), table)
    standard_error = magnitude.std(1) / np.sqrt(samples)
    assert np.all(np.abs(value.numpy() - magnitude.mean(1)) < 4 * standard_error)


# --- exactness and accuracy on synthetic decays -------------------------------------------------


@pytest.mark.parametrize("model", ["loglinear", "mono", "ncexp", "mono-offset"])
def test_noiseless_decays_are_recovered(model):
    rng = np.random.default_rng(0)
    t2 = rng.uniform(8, 95, 500)
    s0 = rng.uniform(50, 5000, 500)
    signal = decays(t2, s0)
    sigma = None
    if model == "ncexp":  # noise-free data of the model itself: the Rician mean at sigma
        sigma = 20.0
        signal = rician_mean(signal, sigma)
    if model == "mono-offset":
        signal = signal + 0.05 * s0[:, None]
    fit = fit_t2(signal, TE, model=model, sigma=sigma, dtype=torch.float64)
    assert fit.converged.all() and fit.valid.all()
    assert np.max(np.abs(fit.t2_ms - t2) / t2) < 1e-4
    assert np.max(np.abs(fit.s0 - s0) / s0) < 1e-4
    assert np.all(fit.r2 > 0.999999)


@pytest.fixture(scope="module")
def short_t2_decays():
    """T2 15-25 ms at SNR 40: the late echoes reach the Rician noise floor."""
    rng = np.random.default_rng(11)
    t2 = rng.uniform(15, 25, 20_000)
    return t2, rician(decays(t2), 25.0, rng)


def test_default_fit_removes_the_noise_floor_bias(short_t2_decays):
    t2, signal = short_t2_decays
    bias = {}
    for model in ("ncexp", "mono", "loglinear"):
        fit = fit_t2(signal, TE, model=model, sigma=25.0)
        assert fit.converged.mean() > 0.999 and fit.valid.mean() > 0.999, model
        bias[model] = float(np.nanmean(fit.t2_ms - t2))
    assert abs(bias["ncexp"]) < 0.3
    # The uncorrected fits read the floor as slower decay: T2 too long, log-linear worst.
    assert bias["mono"] > 0.8 and bias["mono"] > 4 * abs(bias["ncexp"])
    assert bias["loglinear"] > 1.5 * bias["mono"]


def test_default_fit_estimates_sigma_it_is_not_told(short_t2_decays):
    t2, signal = short_t2_decays
    # Append pure-noise background voxels, as an image has around the knee.
    rng = np.random.default_rng(12)
    background = rician(np.zeros((10_000, TE.size)), 25.0, rng)
    fit = fit_t2(np.concatenate([signal, background]), TE)
    assert fit.sigma_source == "background" and fit.sigma == pytest.approx(25.0, rel=0.03)
    assert abs(np.nanmean(fit.t2_ms[: t2.size] - t2)) < 0.3


def test_a_depressed_first_echo_does_not_bias_the_default():
    rng = np.random.default_rng(3)
    t2 = rng.uniform(30, 50, 10_000)
    clean = decays(t2)
    depressed = clean.copy()
    depressed[:, 0] *= 0.8  # the stimulated-echo error of real MESE trains
    noise = [rng.normal(0, 5.0, clean.shape) for _ in range(2)]
    signal = np.hypot(depressed + noise[0], noise[1])
    reference = np.hypot(clean + noise[0], noise[1])
    default = fit_t2(signal, TE, sigma=5.0)
    assert default.echoes_used == tuple(range(1, TE.size))
    assert abs(np.nanmean(default.t2_ms - t2)) < 0.3
    np.testing.assert_array_equal(default.t2_ms, fit_t2(reference, TE, sigma=5.0).t2_ms)
    # Keeping echo 1 pulls T2 long by far more than the noise does.
    kept = fit_t2(signal, TE, sigma=5.0, skip_first_echo=False)
    assert np.nanmean(kept.t2_ms - t2) > 2.0


def test_out_of_bound_voxels_are_flagged_not_clipped():
    t2 = np.repeat([8.0, 40.0, 150.0], 50)
    signal = rician(decays(t2), 2.0, np.random.default_rng(1))
    fit = fit_t2(signal, TE, sigma=2.0, t2_bounds_ms=(10.0, 100.0))
    inside = t2 == 40.0
    assert fit.converged.all()
    np.testing.assert_array_equal(fit.out_of_bounds, ~inside)
    assert np.all(np.isnan(fit.t2_ms[~inside]))
    assert np.all(np.abs(fit.t2_ms[inside] - 40.0) < 1.0)
    flags = fit.flags
    assert np.all(flags[~inside] == FLAG_FITTED | FLAG_CONVERGED | FLAG_OUT_OF_BOUNDS)
    assert np.all(flags[inside] == FLAG_FITTED | FLAG_CONVERGED)
    # With wider bounds the same voxels get their fitted values, nowhere near a clip at 100 ms.
    wide = fit_t2(signal, TE, sigma=2.0, t2_bounds_ms=(1.0, 300.0))
    assert wide.valid.all()
    assert np.all(np.abs(wide.t2_ms[t2 == 150.0] - 150.0) < 15.0)
    assert np.all(np.abs(wide.t2_ms[t2 == 8.0] - 8.0) < 1.5)


def test_min_r2_rejects_noise_and_keeps_tissue():
    rng = np.random.default_rng(2)
    tissue = rician(decays(np.full(2000, 40.0)), 20.0, rng)
    noise = rician(np.zeros((2000, TE.size)), 20.0, rng)
    signal = np.concatenate([tissue, noise])
    is_tissue = np.arange(4000) < 2000
    loose = fit_t2(signal, TE, model="mono", t2_bounds_ms=(0, 1e6))
    assert not loose.low_r2.any()
    assert np.median(loose.r2[is_tissue]) > 0.98 and np.median(loose.r2[~is_tissue]) < 0.6
    strict = fit_t2(signal, TE, model="mono", t2_bounds_ms=(0, 1e6), min_r2=0.9)
    assert strict.low_r2[is_tissue].mean() < 0.01
    assert strict.low_r2[~is_tissue].mean() > 0.95
    assert np.all(np.isnan(strict.t2_ms[strict.low_r2]))
    assert np.all(strict.flags[strict.low_r2] & FLAG_LOW_R2)
    np.testing.assert_array_equal(strict.r2, loose.r2)  # the cut flags, it does not refit


def test_float32_agrees_with_float64_and_chunks_do_not_matter(short_t2_decays):
    _, signal = short_t2_decays
    single = fit_t2(signal[:5000], TE, sigma=25.0)
    double = fit_t2(signal[:5000], TE, sigma=25.0, dtype=torch.float64)
    assert single.dtype == "float32" and double.dtype == "float64"
    assert np.nanmax(np.abs(single.t2_ms - double.t2_ms)) < 0.05
    # Chunks change only rounding (vectorised vs scalar loop tails), within the float32 tolerance.
    chunked = fit_t2(signal[:5000], TE, sigma=25.0, chunk_voxels=700)
    np.testing.assert_allclose(chunked.t2_ms, single.t2_ms, atol=0.02)


def test_mask_limits_the_fit():
    signal = rician(decays(np.full((6, 7), 40.0)), 10.0, np.random.default_rng(4))
    mask = np.zeros((6, 7), bool)
    mask[2:4, 1:5] = True
    fit = fit_t2(signal, TE, sigma=10.0, mask=mask)
    np.testing.assert_array_equal(fit.fitted, mask)
    assert np.all(np.isnan(fit.t2_ms[~mask])) and np.all(fit.flags[~mask] == 0)
    assert np.all(np.abs(fit.t2_ms[mask] - 40.0) < 5.0)
    assert fit.summary()["voxels_fitted"] == 8


def test_bad_arguments_are_refused():
    signal = decays(np.full(10, 40.0))
    with pytest.raises(KneeSegError, match="unknown T2 model"):
        fit_t2(signal, TE, model="biexp")
    with pytest.raises(InputError, match="does not hold 5 echoes"):
        fit_t2(signal, TE[:5])
    with pytest.raises(InputError, match="not increasing"):
        fit_t2(signal, TE[::-1])
    with pytest.raises(InputError, match="needs at least 4 echoes"):
        fit_t2(signal[:, :4], TE[:4], model="mono-offset")
    with pytest.raises(InputError, match="mask of shape"):
        fit_t2(signal, TE, model="mono", mask=np.ones(9, bool))
    with pytest.raises(InputError, match="background"):
        fit_t2(signal, TE)  # ncexp without sigma, and every voxel is tissue
    with pytest.raises(InputError, match="3D volume"):
        fit_t2_volume(Volume(np.ones((3, 4, 5)), (1, 1, 1)))
    if not torch.cuda.is_available():
        with pytest.raises(KneeSegError, match="no CUDA"):
            fit_t2(signal, TE, model="mono", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu(short_t2_decays):
    _, signal = short_t2_decays
    cpu = fit_t2(signal, TE, sigma=25.0)
    gpu = fit_t2(signal, TE, sigma=25.0, device="cuda")
    assert gpu.device.startswith("cuda")
    assert np.nanmax(np.abs(cpu.t2_ms - gpu.t2_ms)) < 0.05


# --- the knee phantom ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    """Synthetic MESE of the real bundled knee label map (every 4th voxel in-plane, 2nd slice)."""
    full = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    sx, sy, sz = full.spacing
    labels = Volume(
        np.ascontiguousarray(full.array[::2, ::4, ::4]), (4 * sx, 4 * sy, 2 * sz), full.origin, full.direction
    )
    return labels, synthesize_mese(labels, snr=40.0, seed=3)


def test_noise_sigma_from_the_phantom_background(phantom):
    _, scan = phantom
    assert estimate_noise_sigma(scan.image.array[..., 1:]) == pytest.approx(scan.sigma, rel=0.03)


def test_phantom_cartilage_t2_and_maps_on_its_grid(phantom, tmp_path):
    labels, scan = phantom
    cartilage = np.isin(labels.array, [1, 2, 3, 4])
    fit = fit_t2_volume(scan.image, mask=labels.with_array((cartilage * labels.array).astype(np.uint8)))
    mono = fit_t2_volume(scan.image, mask=cartilage, model="mono")
    femoral = labels.array == 1
    assert fit.sigma == pytest.approx(scan.sigma, rel=0.03)
    assert fit.valid[femoral].mean() > 0.99
    error, mono_error = np.nanmean(fit.t2_ms[femoral]) - 40.0, np.nanmean(mono.t2_ms[femoral]) - 40.0
    assert abs(error) < 0.6 and abs(error) < abs(mono_error)
    assert np.all(np.isnan(fit.t2_ms[~cartilage]))
    for name, volume in t2_volumes(fit, scan.image).items():
        back = read_volume(write_volume(volume, tmp_path / f"{name}.nrrd"))
        assert back.same_grid(labels, atol=1e-9), name
    back = read_volume(tmp_path / "t2.nrrd")
    np.testing.assert_array_equal(back.array, np.nan_to_num(fit.t2_ms, nan=0.0))


# --- the real MESE scan (GE MR750, 8 echoes) ----------------------------------------------------


@pytest.fixture(scope="module")
def real_fit():
    scan = read_volume(shared_data("mese_t2_knee_pymskt"))
    return scan, fit_t2_volume(scan)


def test_real_scan_fits_fully(real_fit):
    scan, fit = real_fit
    assert fit.model == "ncexp" and fit.echoes_used == tuple(range(1, 8)) and fit.sigma > 0
    usable = np.any(scan.array[..., 1:] > 0, axis=-1)
    np.testing.assert_array_equal(fit.fitted, usable)
    signal = scan.array[..., 1]
    tissue = signal > 20 * fit.sigma
    assert tissue.sum() > 100_000
    assert fit.converged[tissue].mean() > 0.999
    # The brightest tissue (fluid, fat, marrow; mostly T2 > 100 ms) still fits a clean decay.
    brightest = signal >= np.percentile(signal, 99)
    assert np.median(fit.r2[brightest]) > 0.97
    # Cartilage-range T2 values exist in plenty and fit well.
    plausible = fit.valid & tissue & (fit.t2_ms > 20) & (fit.t2_ms < 60)
    assert plausible.sum() > 20_000 and np.median(fit.r2[plausible]) > 0.95


def test_real_scan_maps_overlay_the_input(real_fit, tmp_path):
    scan, fit = real_fit
    for name, volume in t2_volumes(fit, scan).items():
        back = read_volume(write_volume(volume, tmp_path / f"{name}.nrrd"))
        assert back.size == scan.size and back.array.ndim == 3
        np.testing.assert_allclose(back.spacing, scan.spacing, atol=1e-9)
        np.testing.assert_allclose(back.origin, scan.origin, atol=1e-9)
        np.testing.assert_allclose(back.direction, scan.direction, atol=1e-9)
