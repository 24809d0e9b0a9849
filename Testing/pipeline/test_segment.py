"""``kneeseg segment`` end to end with a small untrained package: the output-folder contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import read_segmentation
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.package import save_package
from KneeSegLogic.tissues import TISSUES

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "mese_t2_knee.nrrd"


def _member(name: str, pixel_mm: float, context: int) -> dict:
    return {"name": name, "weight": 1.0,
            "architecture": {"name": "monai.UNet", "args": {"spatial_dims": 2, "in_channels": 2 * context + 1,
                                                            "out_channels": 1 + len(TISSUES), "channels": [4, 8],
                                                            "strides": [2]}},
            "input": {"kind": "2.5d", "plane": "sagittal", "context_slices": context, "spacing_mm": [pixel_mm, pixel_mm],
                      "slice_spacing_mm": 2.0, "normalisation": {"name": "percentile", "low": 1, "high": 99}}}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    members = [_member("fine", 1.5, 1), _member("coarse", 2.5, 2)]
    spec = {"id": "tiny-test", "version": "0.0.1", "description": "untrained, for tests", "license": "Apache-2.0",
            "labels": {str(t.label): t.key for t in TISSUES}, "members": members,
            "postprocessing": [{"name": "largest_component", "labels": [5, 6, 7]}]}
    states = [build_network(m["architecture"]["name"], m["architecture"]["args"]).state_dict() for m in members]
    folder = tmp_path_factory.mktemp("models") / "tiny-test"
    save_package(folder, spec, states)
    return folder


def test_multi_echo_scan_gives_the_whole_output_folder(tmp_path, package):
    out = tmp_path / "out"
    assert main(["segment", str(SAMPLE), "-o", str(out), "--model", str(package)]) == 0
    scan = read_volume(SAMPLE)
    for name in ("segmentation.seg.nrrd", "uncertainty.nrrd", "mutual_information.nrrd",
                 "t2.nrrd", "t2_r2.nrrd", "t2_s0.nrrd", "regions.nrrd", "report.png", "report.html", "results.json"):
        assert (out / name).is_file(), name
    assert not (out / "uncertainty_foreground.nrrd").exists()  # uncertainty.nrrd is the masked map
    assert not (tmp_path / "out.partial").exists()
    uncertainty = read_volume(out / "uncertainty.nrrd")
    assert uncertainty.same_grid(scan, atol=1e-6)
    assert uncertainty.array.min() >= 0.0 and uncertainty.array.max() <= 1.0
    labels, segments = read_segmentation(out / "segmentation.seg.nrrd")
    assert labels.same_grid(scan, atol=1e-6)
    # Quantised to 1/1000 and, by default, 0 farther than 2 voxels (city-block) from any structure.
    thousandths = uncertainty.array * 1000
    assert np.abs(thousandths - np.round(thousandths)).max() < 1e-3
    header = sitk.ReadImage(str(out / "uncertainty.nrrd"))
    assert header.GetMetaData("KneeSeg.quantisation_step") == "0.001"
    assert header.GetMetaData("KneeSeg.uncertainty_mask").startswith("within 2 voxels")
    near = ndimage.binary_dilation(labels.array > 0, iterations=2)
    assert not uncertainty.array[~near].any() and uncertainty.array[near].any()
    assert not read_volume(out / "mutual_information.nrrd").array[~near].any()
    names = {s.name for s in segments}
    assert names <= {t.name for t in TISSUES} and names
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["id"] == "tiny-test" and len(results["model"]["sha256"]) == 64
    assert results["device"]["type"] == "cpu"
    present = np.unique(labels.array)
    voxel = float(np.prod(scan.spacing))
    by_label = {t.key: t.label for t in TISSUES}
    for key, volume_mm3 in results["volumes_mm3"].items():
        assert volume_mm3 == pytest.approx(np.count_nonzero(labels.array == by_label[key]) * voxel, rel=1e-6)
        assert by_label[key] in present
    assert results["t2"]["echoes_used"] == list(range(2, 9))  # 1-based: echo 1 skipped
    assert read_volume(out / "t2.nrrd").same_grid(scan, atol=1e-6)
    slices = results["uncertainty"]["most_uncertain_slices"]
    assert all(0 <= s["slice_index"] < scan.array.shape[0] for s in slices)
    assert {"inference", "fusion", "postprocessing", "t2", "report", "total"} <= set(results["timings_s"])


def test_oblique_single_echo_input_overlays_exactly(tmp_path, package):
    scan = read_volume(SAMPLE).echo(1)
    angle = np.deg2rad(25)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    oblique = Volume(scan.array, scan.spacing, (3.5, -20.25, 41.0), tilt @ scan.direction)
    write_volume(oblique, tmp_path / "oblique.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "oblique.nii.gz"), "-o", str(out), "--model", str(package), "--no-surfaces",
                 "--full-uncertainty"]) == 0
    written = read_volume(tmp_path / "oblique.nii.gz")
    labels, _ = read_segmentation(out / "segmentation.seg.nrrd")
    assert labels.same_grid(written, atol=1e-5)
    uncertainty = read_volume(out / "uncertainty.nrrd")
    assert uncertainty.same_grid(written, atol=1e-5)
    assert sitk.ReadImage(str(out / "uncertainty.nrrd")).GetMetaData("KneeSeg.uncertainty_mask") == "none"
    assert not (out / "surfaces").exists() and not (out / "t2.nrrd").exists()


def test_existing_output_refused_and_tampered_weights_refused(tmp_path, package, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["segment", str(SAMPLE), "-o", str(out), "--model", str(package)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in package.iterdir():
        (tampered / file.name).write_bytes(file.read_bytes())
    weights = tampered / "member0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["segment", str(SAMPLE), "-o", str(tmp_path / "out2"), "--model", str(tampered)]) == 1
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


def test_sigterm_cancels_cleanly(tmp_path, package):
    """A scheduler's SIGTERM mid-run: exit 130, no output folder and no partial folder left."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "KneeSegLogic", "segment", str(SAMPLE), "-o", str(out),
                                "--model", str(package)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if json.loads(line)["stage"] == "inference":
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "terminated" in stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_failure_on_the_writing_thread_fails_the_run_and_leaves_no_folder(tmp_path, package, capsys, monkeypatch):
    """The label files are written on a second thread: its error must still reach the user."""
    from KneeSegLogic.errors import KneeSegError
    from KneeSegLogic.pipeline import segment

    def full_disk(*args, **kwargs):
        raise KneeSegError("uncertainty.nrrd: no space left on device")

    monkeypatch.setattr(segment, "write_uncertainty_maps", full_disk)
    out = tmp_path / "out"
    assert main(["segment", str(SAMPLE), "-o", str(out), "--model", str(package)]) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
