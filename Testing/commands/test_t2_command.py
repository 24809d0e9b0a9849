"""``kneeseg t2``: maps on the input grid, results.json, cartilage regions from a mask, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_DATA

from KneeSegLogic.commands import main as cli
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.quantification.relaxometry import FLAG_CONVERGED, FLAG_FITTED
from KneeSegLogic.training.phantom import synthesize_mese

torch.set_num_threads(1)

SAMPLE_SCAN = SAMPLE_DATA / "mese_t2_knee.nrrd"
MAPS = ("t2", "t2_r2", "t2_s0", "t2_flags")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_t2_on_the_bundled_sample(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "t2", SAMPLE_SCAN, "-o", out)
    assert code == 0, err
    stages = {json.loads(line)["stage"] for line in stdout.splitlines()}
    assert {"read", "t2_fit", "t2_write", "done"} <= stages
    scan = read_volume(SAMPLE_SCAN)
    maps = {name: read_volume(out / f"{name}.nrrd") for name in MAPS}
    for name, volume in maps.items():  # exactly the input's 3D grid
        assert volume.size == scan.size, name
        np.testing.assert_allclose(volume.spacing, scan.spacing, atol=1e-9)
        np.testing.assert_allclose(volume.origin, scan.origin, atol=1e-9)
        np.testing.assert_allclose(volume.direction, scan.direction, atol=1e-9)
    results = json.loads((out / "results.json").read_text())
    section = results["t2"]
    assert section["model"] == "ncexp" and section["echoes_used"] == [2, 3, 4, 5, 6, 7, 8]
    assert section["noise_sigma_source"] == "background" and section["noise_sigma"] > 0
    assert section["all_fitted_voxels"]["fraction_converged"] > 0.99
    assert results["device"]["type"] == "cpu" and results["timings_s"]["t2_fit"] > 0
    t2, flags = maps["t2"].array, maps["t2_flags"].array
    valid = t2 > 0
    assert valid.sum() == section["all_fitted_voxels"]["voxels_valid"] > 50_000
    assert t2.max() <= 100.0
    np.testing.assert_array_equal(valid, flags == FLAG_FITTED | FLAG_CONVERGED)
    assert section["all_fitted_voxels"]["t2_median_ms"] == pytest.approx(np.median(t2[valid]), abs=1e-3)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """A synthetic 7-echo scan of the real bundled knee anatomy (coarsened) and its labels."""
    folder = tmp_path_factory.mktemp("phantom")
    full = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    sx, sy, sz = full.spacing
    labels = Volume(
        np.ascontiguousarray(full.array[::2, ::4, ::4]), (4 * sx, 4 * sy, 2 * sz), full.origin, full.direction
    )
    scan = synthesize_mese(labels, snr=60.0, seed=1)
    return write_volume(scan.image, folder / "scan.nrrd"), write_volume(labels, folder / "labels.nrrd"), scan


def test_t2_with_a_mask_divides_the_cartilage(capsys, tmp_path, phantom_files):
    scan_path, labels_path, scan = phantom_files
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "t2",
        scan_path,
        "-o",
        out,
        "--mask",
        labels_path,
        "--regions",
        "thomas",
        "--sigma",
        scan.sigma,
        "--keep-first-echo",
        "--min-r2",
        0.5,
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    section = results["t2"]
    assert section["noise_sigma_source"] == "given" and section["noise_sigma"] == pytest.approx(scan.sigma)
    assert section["echoes_used"] == list(range(1, 8)) and section["min_r2"] == 0.5
    femoral = section["per_structure"]["femoral_cartilage"]
    assert femoral["t2_mean_ms"] == pytest.approx(40.0, abs=0.6) and femoral["fraction_valid"] > 0.99
    assert section["cartilage"]["variant"] == "thomas"
    assert (out / "regions.csv").is_file() and (out / "regions.nrrd").is_file()
    labels = read_volume(labels_path).array
    flags = read_volume(out / "t2_flags.nrrd").array
    np.testing.assert_array_equal(flags > 0, labels > 0)  # the fit is limited to the mask
    rows = {row["name"]: row for row in section["cartilage"]["regions"]}
    femoral_rows = [
        rows[f"femoral_{side}_{third}_{layer}"]
        for side in ("medial", "lateral")
        for third in ("anterior", "central", "posterior")
        for layer in ("deep", "superficial")
    ]
    # The phantom's femoral cartilage is 40 ms throughout: every populated subregion says so.
    means = [row["t2_mean_ms"] for row in femoral_rows if row["voxels"] >= 20]
    assert len(means) >= 10 and all(abs(mean - 40.0) < 2.0 for mean in means)


def test_a_3d_input_is_refused_without_output(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "t2", SAMPLE_DATA / "knee_labels.nrrd", "-o", out)
    assert code == 1 and "multi-echo" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_missing_echo_times_are_refused_without_output(capsys, tmp_path):
    scan = read_volume(SAMPLE_SCAN)
    echoes = [scan.echo(e).to_sitk() for e in range(3)]
    path = tmp_path / "no_times.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(echoes), str(path))  # 4D NIfTI: no echo times in the header
    out = tmp_path / "out"
    code, _, err = run(capsys, "t2", path, "-o", out)
    assert code == 1 and "echo times" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # Given on the command line they are enough; too few echoes after skipping echo 1 is refused.
    code, _, err = run(capsys, "t2", path, "-o", out, "--echo-times", "10,20,30", "--model", "mono-offset")
    assert code == 1 and "needs at least 4 echoes" in err and not out.exists()
