"""DESS T2, EPG T2 from all echoes, T1rho/T2* through the same solver, partial volume, region files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DATA, shared_data

from KneeSegLogic.commands.main import main
from KneeSegLogic.errors import InputError
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.dess import DessParameters, dess_signals, dess_t2, read_dess_parameters
from KneeSegLogic.quantification.epg import cpmg_echoes, echo_spacing_ms, fit_epg
from KneeSegLogic.quantification.regions import analyse_cartilage, divide_cartilage, read_region_spec
from KneeSegLogic.quantification.relaxometry import fit_t2
from KneeSegLogic.quantification.t2maps import surface_layer
from KneeSegLogic.training.phantom import rician, tissue_maps

torch.set_num_threads(1)

# The pyKNEEr DESS subject's sequence (GE MR750): TR 25 ms, TE 7.48 ms, 30 degrees, spoiler 3132 G us/cm over 1760 us.
DESS = DessParameters(25.0, 7.48, 30.0, spoiler_area_mt_ms_per_m=31.32, spoiler_duration_ms=1.76)


# --- DESS ---------------------------------------------------------------------------------------


def test_dess_formula_inverts_its_signal_model():
    t2 = np.linspace(10.0, 90.0, 50)
    np.testing.assert_allclose(dess_t2(dess_signals(t2, DESS, 500.0), DESS), t2, rtol=1e-10)
    # An echo ratio no T2 explains (PSIF echo as bright as FISP) gives NaN, not a negative T2.
    assert np.isnan(dess_t2(np.array([[100.0, 100.0]]), DESS)).all()


def _dess_steady_state(t2_ms: np.ndarray, parameters: DessParameters, periods: int = 400) -> np.ndarray:
    """FISP and PSIF echoes by an EPG simulation of the sequence (no diffusion), to steady state.

    Each TR: pulse alpha (about x) -> S1 = |F0| at TE -> relaxation over TR -> one dephasing
    order from the unbalanced spoiler. S2 is the F-1 state after the pulse, refocused at TR - TE.
    """
    tr, te, t1 = parameters.repetition_time_ms, parameters.echo_time_ms, parameters.t1_ms
    alpha = np.radians(parameters.flip_angle_deg)
    orders = periods + 2
    fp = np.zeros((orders, t2_ms.size), complex)
    fm = np.zeros_like(fp)
    z = np.zeros_like(fp)
    z[0] = 1.0
    e2, e1 = np.exp(-tr / t2_ms), np.exp(-tr / t1)
    c2, s2, sa, ca = np.cos(alpha / 2) ** 2, np.sin(alpha / 2) ** 2, np.sin(alpha), np.cos(alpha)
    for _ in range(periods):
        fp, fm, z = (
            c2 * fp + s2 * fm - 1j * sa * z,
            s2 * fp + c2 * fm + 1j * sa * z,
            -0.5j * sa * fp + 0.5j * sa * fm + ca * z,
        )
        s1 = np.abs(fp[0]) * np.exp(-te / t2_ms)
        s2_echo = np.abs(fm[1]) * np.exp(-(tr - te) / t2_ms)
        fp, fm, z = fp * e2, fm * e2, z * e1
        z[0] += 1 - e1
        fp = np.concatenate([np.conj(fm[1:2]), fp[:-1]])
        fm = np.concatenate([fm[1:], np.zeros((1, t2_ms.size))])
        fp[0] = np.conj(fm[0])
    return np.stack([s1, s2_echo], axis=-1)


def test_dess_t2_of_simulated_steady_state_signals():
    """The formula (T1 >> TR approximation) against an exact EPG steady state of the sequence."""
    parameters = DessParameters(25.0, 7.48, 30.0, t1_ms=1200.0)  # no spoiler data: no diffusion term
    truth = np.array([20.0, 30.0, 40.0, 50.0, 60.0])
    estimate = dess_t2(_dess_steady_state(truth, parameters), parameters)
    assert np.all(np.abs(estimate - truth) / truth < 0.03), estimate


def test_dess_parameters_from_options_and_missing():
    parameters = read_dess_parameters(None, (7.0, 43.0), repetition_time_ms=25.0, flip_angle_deg=25.0)
    assert parameters.echo_time_ms == 7.0 and parameters.sources["flip_angle_deg"] == "option"
    assert parameters.sources["t1_ms"] == "default" and parameters.constants()[1] == 0.0
    with pytest.raises(InputError, match="repetition_time_ms, flip_angle_deg"):
        read_dess_parameters(None, (7.0, 43.0))


def test_dess_on_the_real_pykneer_scan(tmp_path):
    """pyKNEEr's DESS subject (GPL data: read from ../shared/data, nothing derived is kept)."""
    import tarfile

    archive = shared_data("dess_knee_pykneer") / "demo_original_01_DESS.tar.xz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "series"  # both echoes of the series in one folder, as a scanner exports them
    folder.mkdir()
    for echo, path in enumerate(sorted(tmp_path.rglob("*.dcm"))):
        path.rename(folder / f"{echo:04d}.dcm")
    scan = read_volume(folder)
    parameters = read_dess_parameters(folder, scan.echo_times_ms)
    assert parameters.sources["spoiler_area_mt_ms_per_m"] == "dicom"
    assert parameters.repetition_time_ms == 25.0 and parameters.flip_angle_deg == 30.0
    assert parameters.spoiler_area_mt_ms_per_m == pytest.approx(31.32)
    # Bright tissue of the scan (pyKNEEr's mask: echo 1 above 15 % of its maximum).
    echo1 = scan.array[..., 0]
    tissue = echo1 > 0.15 * echo1.max()
    t2 = dess_t2(scan.array[tissue], parameters)
    assert np.isfinite(t2).mean() > 0.9
    assert 15.0 < np.nanmedian(t2[(t2 > 0) & (t2 < 100)]) < 60.0


# --- EPG ------------------------------------------------------------------------------------


def test_epg_at_180_degrees_is_a_pure_exponential_and_derivatives_are_exact():
    rate = torch.tensor([0.25, 0.4], dtype=torch.float64)
    value, _, _ = cpmg_echoes(rate, torch.ones(2, dtype=torch.float64), 8, 10.0, 1000.0, 180.0)
    np.testing.assert_allclose(value.numpy(), np.exp(-np.outer(np.arange(1, 9), rate.numpy())), rtol=1e-12)
    b1 = torch.tensor([0.7, 0.9], dtype=torch.float64)
    _, d_rate, d_b1 = cpmg_echoes(rate, b1, 8, 10.0, 1000.0, 180.0, derivatives=True)
    h = 1e-6
    numeric_b1 = (
        cpmg_echoes(rate, b1 + h, 8, 10.0, 1000.0, 180.0)[0] - cpmg_echoes(rate, b1 - h, 8, 10.0, 1000.0, 180.0)[0]
    ) / (2 * h)
    numeric_rate = (
        cpmg_echoes(rate + h, b1, 8, 10.0, 1000.0, 180.0)[0] - cpmg_echoes(rate - h, b1, 8, 10.0, 1000.0, 180.0)[0]
    ) / (2 * h)
    assert torch.allclose(d_b1, numeric_b1, atol=1e-8) and torch.allclose(d_rate, numeric_rate, atol=1e-8)
    # 120 degrees: echo 2 above echo 1 (the stimulated echo joins in), the CPMG signature.
    low, _, _ = cpmg_echoes(rate[:1], torch.tensor([2 / 3], dtype=torch.float64), 8, 10.0, 1000.0, 180.0)
    assert low[1, 0] > low[0, 0]


def test_epg_fit_recovers_t2_where_mono_exponential_fails():
    rng = np.random.default_rng(0)
    voxels, spacing = 3000, 10.0
    te = spacing * np.arange(1, 9)
    t2 = rng.uniform(20.0, 70.0, voxels)
    b1 = rng.uniform(120.0, 180.0, voxels) / 180.0
    clean = 1000.0 * cpmg_echoes(torch.tensor(spacing / t2), torch.tensor(b1), 8, spacing, 1000.0, 180.0)[0].T.numpy()
    signal = rician(np.concatenate([clean, np.zeros((2000, 8))]), 10.0, rng).astype(np.float32)
    tissue = np.arange(len(signal)) < voxels
    epg = fit_epg(signal, te, mask=tissue, t2_bounds_ms=(0.0, 1e4))
    mono = fit_t2(signal, te, mask=tissue, t2_bounds_ms=(0.0, 1e4))  # ncexp without echo 1
    low_b1 = b1 < 140.0 / 180.0
    epg_error, mono_error = epg.t2_ms[tissue] - t2, mono.t2_ms[tissue] - t2
    assert abs(np.nanmean(epg_error)) < 0.5 and abs(np.nanmean(epg_error[low_b1])) < 0.5
    assert abs(np.nanmean(mono_error[low_b1])) > 0.5
    assert np.nanmedian(np.abs(epg_error)) < np.nanmedian(np.abs(mono_error))
    assert np.nanmedian(np.abs(epg.b1[tissue] - b1)) < 0.03
    assert epg.converged[tissue].mean() > 0.99


def test_epg_needs_an_even_cpmg_train():
    assert echo_spacing_ms([6.3, 12.6, 18.9, 25.2]) == pytest.approx(6.3)
    with pytest.raises(InputError, match="evenly spaced"):
        echo_spacing_ms([10.0, 20.0, 40.0, 80.0])


# --- T1rho and T2* through the same solver ----------------------------------------------------


def test_t1rho_with_a_spin_lock_time_of_zero():
    tsl = np.array([0.0, 10.0, 40.0, 80.0])
    truth = np.array([35.0, 50.0])
    signal = 800.0 * np.exp(-tsl / truth[:, None])
    fit = fit_t2(signal, tsl, model="mono", skip_first_echo=False, t2_bounds_ms=(0.0, 200.0))
    np.testing.assert_allclose(fit.t2_ms, truth, rtol=1e-3)


# --- partial volume and user regions -----------------------------------------------------------


@pytest.fixture(scope="module")
def thick_slice_phantom():
    """The bundled knee with fluid beside cartilage, imaged with 4x thicker slices (partial volume)."""
    full = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    labels = Volume(
        np.ascontiguousarray(full.array[:, ::4, ::4]),
        (4 * full.spacing[0], 4 * full.spacing[1], full.spacing[2]),
        full.origin,
        full.direction,
    )
    density, t2 = tissue_maps(labels)
    te = np.arange(1, 8) * 10.0
    with np.errstate(divide="ignore", invalid="ignore"):
        decay = np.where(t2[..., None] > 0, np.exp(-te / np.maximum(t2[..., None], 1e-6)), 0.0)
    fine = 1000.0 * density[..., None] * decay
    thick = 4
    k = labels.array.shape[0] // thick * thick
    signal = fine[:k].reshape(k // thick, thick, *fine.shape[1:]).mean(1)  # slices along k averaged
    thick_labels = labels.array[1:k:thick]  # the label at each thick slice's centre
    grid = Volume(
        thick_labels, (labels.spacing[0], labels.spacing[1], thick * labels.spacing[2]), labels.origin, labels.direction
    )
    noisy = rician(signal, 10.0, np.random.default_rng(2)).astype(np.float32)
    return grid, Volume(noisy, grid.spacing, grid.origin, grid.direction, tuple(te))


def test_surface_exclusion_removes_the_fluid_bias(thick_slice_phantom, tmp_path):
    labels, scan = thick_slice_phantom
    fit = fit_t2(scan.array, scan.echo_times_ms, mask=labels.array == 1)
    femoral = labels.array == 1
    surface = surface_layer(labels) & femoral
    assert 0.1 < surface.sum() / femoral.sum() < 0.9
    # Fluid (T2 300 ms) mixed into surface voxels lengthens their T2; the deeper voxels read true.
    assert np.nanmean(fit.t2_ms[surface]) - 40.0 > 2 * abs(np.nanmean(fit.t2_ms[femoral & ~surface]) - 40.0)
    t2_map = labels.with_array(fit.t2_ms)
    kept = analyse_cartilage(labels, t2_map, tmp_path, excluded=None)
    dropped = analyse_cartilage(labels, t2_map, tmp_path, excluded=surface_layer(labels))
    plate_all, plate_deep = kept["plates"][0], dropped["plates"][0]
    assert plate_all["name"] == "femoral_cartilage"
    assert abs(plate_deep["t2_mean_ms"] - 40.0) < abs(plate_all["t2_mean_ms"] - 40.0)
    assert 0 < plate_deep["fraction_excluded"] < 1 and "fraction_excluded" not in plate_all
    assert all("fraction_excluded" in row for row in dropped["regions"])


def test_region_recipe_file_changes_the_split(tmp_path):
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    recipe_path = tmp_path / "wide.json"
    recipe_path.write_text(json.dumps({"central_arc_deg": [-60, 60], "depth_fraction": 0.3}))
    recipe, user = read_region_spec(recipe_path)
    assert user is None and recipe.central_arc_deg == (-60.0, 60.0)
    default = divide_cartilage(labels)
    wide = divide_cartilage(labels, recipe)
    central = [103, 104, 109, 110]
    deep = [101, 103, 105, 107, 109, 111]
    assert np.isin(wide.regions.array, central).sum() > 1.5 * np.isin(default.regions.array, central).sum()
    assert np.isin(wide.regions.array, deep).sum() < np.isin(default.regions.array, deep).sum()
    assert wide.geometry.to_json()["femoral_recipe"]["depth_fraction"] == 0.3
    with pytest.raises(InputError, match="neither a region recipe"):
        read_region_spec(tmp_path / "missing.nrrd")
    (tmp_path / "bad.json").write_text(json.dumps({"central_arc_deg": [30, -30]}))
    with pytest.raises(InputError, match="central_arc_deg"):
        read_region_spec(tmp_path / "bad.json")


def test_relax_command_t1rho_with_a_region_label_file(tmp_path, capsys):
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    small = Volume(
        np.ascontiguousarray(labels.array[::2, ::4, ::4]),
        tuple(s * f for s, f in zip(labels.spacing, (4, 4, 2))),
        labels.origin,
        labels.direction,
    )
    density, _ = tissue_maps(small)
    truth = np.where(np.isin(small.array, [1, 2, 3, 4]), 45.0, 80.0)
    tsl = np.array([0.0, 10.0, 40.0, 80.0])
    signal = rician(1000.0 * density[..., None] * np.exp(-tsl / truth[..., None]), 10.0, np.random.default_rng(1))
    scan_path = write_volume(
        Volume(signal.astype(np.float32), small.spacing, small.origin, small.direction, (1.0, 2.0, 3.0, 4.0)),
        tmp_path / "t1rho.nrrd",
    )
    mask_path = write_volume(small, tmp_path / "labels.nrrd")
    regions = np.where(small.array == 1, 7, 0).astype(np.uint8)  # one user region: the femoral cartilage
    region_path = write_volume(small.with_array(regions), tmp_path / "my_regions.nrrd")
    out = tmp_path / "out"
    code = main(
        [
            "relax",
            str(scan_path),
            "--kind",
            "t1rho",
            "--times",
            "0,10,40,80",
            "--mask",
            str(mask_path),
            "--regions",
            str(region_path),
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    section = results["t1rho"]
    assert section["quantity"] == "T1rho" and section["echo_times_ms"] == [0.0, 10.0, 40.0, 80.0]
    assert (out / "t1rho.nrrd").is_file() and not (out / "t2.nrrd").exists()
    rows = section["cartilage"]["regions"]
    assert [r["name"] for r in rows] == ["region_7"]
    assert rows[0]["t2_mean_ms"] == pytest.approx(45.0, abs=1.5)
