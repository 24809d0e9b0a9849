"""``kneeseg segment`` options end to end: ``--format nifti dicom-seg``, ``--roi-subset``, ``--fast``, ``--no-report``.

Every run goes through :func:`KneeSegLogic.commands.main.main` in-process with a tiny untrained
two-member package and a cropped single-echo copy of the bundled sample (12 x 48 x 48 voxels),
so each test takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom_series
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from KneeSegLogic.commands.main import main
from KneeSegLogic.io.outputs import (
    DICOM_SEG_FILE,
    NIFTI_LABELS_FILE,
    REPORT_IMAGE,
    REPORT_PAGE,
    RESULTS_FILE,
    SEGMENTATION_FILE,
)
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import read_segmentation
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.segmentation.networks import build_network
from KneeSegLogic.segmentation.package import save_package
from KneeSegLogic.tissues import BY_KEY, BY_LABEL, TISSUES

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "mese_t2_knee.nrrd"

# (name, in-plane working spacing in mm): --fast keeps the coarsest.
MEMBERS = (("fine", 1.5), ("coarse", 2.5))


def _member(name: str, pixel_mm: float) -> dict:
    return {
        "name": name,
        "weight": 1.0,
        "architecture": {
            "name": "monai.UNet",
            "args": {
                "spatial_dims": 2,
                "in_channels": 3,
                "out_channels": 1 + len(TISSUES),
                "channels": [4, 8],
                "strides": [2],
            },
        },
        "input": {
            "kind": "2.5d",
            "plane": "sagittal",
            "context_slices": 1,
            "spacing_mm": [pixel_mm, pixel_mm],
            "normalisation": {"name": "percentile", "low": 1, "high": 99},
        },
    }


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    members = [_member(name, mm) for name, mm in MEMBERS]
    spec = {
        "id": "tiny-options",
        "version": "0.0.1",
        "description": "untrained, for option tests",
        "license": "Apache-2.0",
        "labels": {str(t.label): t.key for t in TISSUES},
        "members": members,
    }
    states = [build_network(m["architecture"]["name"], m["architecture"]["args"]).state_dict() for m in members]
    folder = tmp_path_factory.mktemp("models") / "tiny-options"
    save_package(folder, spec, states)
    return folder


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """The sample's second echo, cropped to 12 slices of 48 x 48 pixels around the knee."""
    sample = read_volume(SAMPLE).echo(1)
    return _crop(sample)


def _crop(volume: Volume) -> Volume:
    """``volume[6:18, 40:88, 40:88]`` (k, j, i) with the origin moved to the first kept voxel."""
    start = np.array([40, 40, 6, 1.0])  # (i, j, k, 1)
    origin = (volume.index_to_physical() @ start)[:3]
    return Volume(
        np.ascontiguousarray(volume.array[6:18, 40:88, 40:88]), volume.spacing, tuple(origin), volume.direction
    )


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory, scan: Volume) -> Path:
    path = tmp_path_factory.mktemp("scan") / "knee.nrrd"
    write_volume(scan, path)
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, package: Path, scan_file: Path) -> Path:
    """One run with every structure and the report (no surfaces), the reference for the option runs."""
    out = tmp_path_factory.mktemp("runs") / "all"
    assert main(["segment", str(scan_file), "-o", str(out), "--model", str(package), "--quiet", "--no-surfaces"]) == 0
    return out


def _segment(scan: Path, out: Path, package: Path, *options: str) -> dict:
    assert main(["segment", str(scan), "-o", str(out), "--model", str(package), "--quiet", *options]) == 0
    return json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))


def test_nifti_label_map_has_the_labels_and_geometry_of_the_seg_nrrd(tmp_path, package, scan_file):
    nibabel = pytest.importorskip("nibabel")
    out = tmp_path / "out"
    _segment(scan_file, out, package, "--format", "nifti", "--no-surfaces", "--no-report")
    labels, _ = read_segmentation(out / SEGMENTATION_FILE)
    assert np.count_nonzero(labels.array), "an empty label map would prove nothing"
    image = nibabel.load(out / NIFTI_LABELS_FILE)
    data = np.asarray(image.dataobj)
    assert data.shape == labels.array.shape[::-1]  # NIfTI is (i, j, k)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), labels.array)
    # Every corner voxel lands at the same point: NIfTI's RAS is LPS with x and y negated.
    corners = np.array([[i, j, k, 1.0] for i in (0, 47) for j in (0, 47) for k in (0, 11)]).T
    lps = (labels.index_to_physical() @ corners)[:3]
    np.testing.assert_allclose((image.affine @ corners)[:3], lps * np.array([[-1], [-1], [1]]), atol=1e-4)


def test_dicom_seg_references_the_source_series(tmp_path, package, scan):
    hd = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    series = tmp_path / "series"
    files = write_dicom_series(
        series,
        np.clip(scan.array, 0, 32767).astype(np.int16),
        spacing=tuple(scan.spacing),
        origin=tuple(scan.origin),
        orientation=np.asarray(scan.direction),
    )
    frame_of_reference = pydicom.uid.generate_uid()
    for file in files:  # scanners write it; the series helper leaves it out
        dataset = pydicom.dcmread(file)
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.save_as(file)
    out = tmp_path / "out"
    _segment(series, out, package, "--format", "nifti", "dicom-seg", "--no-surfaces", "--no-report")
    labels, _ = read_segmentation(out / SEGMENTATION_FILE)
    assert (out / NIFTI_LABELS_FILE).is_file()
    present = [int(v) for v in np.unique(labels.array) if v]
    assert present, "an empty label map would prove nothing"

    seg = hd.seg.segread(out / DICOM_SEG_FILE)
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f) for f in files)}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    referenced = {
        i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced == set(sources)
    assert seg.FrameOfReferenceUID == frame_of_reference
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [BY_LABEL[v].name for v in present]
    by_slice = sorted(sources, key=lambda uid: int(sources[uid].InstanceNumber))  # slice k is instance k + 1
    for number, value in enumerate(present, start=1):
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=by_slice, segment_numbers=[number], skip_overlap_checks=True
        )[..., 0]
        np.testing.assert_array_equal(mask, labels.array == value)


def test_roi_subset_keeps_only_the_named_structures(tmp_path, package, scan_file, baseline):
    full, _ = read_segmentation(baseline / SEGMENTATION_FILE)
    found = [BY_LABEL[int(v)].key for v in np.unique(full.array) if v]
    assert len(found) >= 3, f"the untrained package should predict several structures, found {found}"
    subset = found[:2]
    results = _segment(scan_file, tmp_path / "out", package, "--roi-subset", *subset, "--no-report")
    labels, segments = read_segmentation(tmp_path / "out" / SEGMENTATION_FILE)
    # The network predicts every structure jointly, so the subset is the full map outside the rest.
    kept = np.isin(full.array, [BY_KEY[k].label for k in subset])
    np.testing.assert_array_equal(labels.array, np.where(kept, full.array, 0))
    assert {s.name for s in segments} == {BY_KEY[k].name for k in subset}
    assert set(results["volumes_mm3"]) == set(subset)
    baseline_volumes = json.loads((baseline / RESULTS_FILE).read_text(encoding="utf-8"))["volumes_mm3"]
    for key in subset:
        assert results["volumes_mm3"][key] == pytest.approx(baseline_volumes[key], rel=1e-9)
    assert set(results["surfaces"]["structures"]) == set(subset)
    written = {p.stem for p in (tmp_path / "out" / "surfaces").glob("*.vtp")}
    assert written == set(subset)
    assert results["options"]["roi_subset"] == subset


def test_fast_runs_only_the_coarsest_member_without_tta(tmp_path, package, scan_file, baseline):
    results = _segment(scan_file, tmp_path / "out", package, "--fast", "--flip-tta", "--no-surfaces", "--no-report")
    assert results["options"]["fast"] is True
    assert results["options"]["members_run"] == ["coarse"]
    assert results["options"]["flip_tta"] is False
    assert [m["name"] for m in results["model"]["members"]] == ["coarse"]
    everything = json.loads((baseline / RESULTS_FILE).read_text(encoding="utf-8"))
    assert everything["options"]["members_run"] == ["fine", "coarse"]


def test_no_report_writes_no_report_files(tmp_path, package, scan_file, baseline):
    assert (baseline / REPORT_IMAGE).is_file() and (baseline / REPORT_PAGE).is_file()
    results = _segment(scan_file, tmp_path / "out", package, "--no-report", "--no-surfaces")
    assert not (tmp_path / "out" / REPORT_IMAGE).exists() and not (tmp_path / "out" / REPORT_PAGE).exists()
    assert "report" not in results["timings_s"] and results["options"]["report"] is False
    assert (tmp_path / "out" / SEGMENTATION_FILE).is_file()


def test_stl_adds_an_stl_file_beside_each_vtp_surface(tmp_path, package, scan_file):
    default = _segment(scan_file, tmp_path / "vtp", package, "--no-report")["surfaces"]["structures"]
    assert default and all(set(entry["files"]) == {"vtp"} for entry in default.values())
    assert not list((tmp_path / "vtp" / "surfaces").glob("*.stl"))
    results = _segment(scan_file, tmp_path / "out", package, "--stl", "--no-report")
    structures = results["surfaces"]["structures"]
    assert set(structures) == set(default)
    for key, entry in structures.items():
        assert entry["files"] == {"stl": f"surfaces/{key}.stl", "vtp": f"surfaces/{key}.vtp"}
        stl = tmp_path / "out" / entry["files"]["stl"]
        facets = int.from_bytes(stl.read_bytes()[80:84], "little")
        reader = vtkXMLPolyDataReader()
        reader.SetFileName(str(tmp_path / "out" / entry["files"]["vtp"]))
        reader.Update()
        assert facets == reader.GetOutput().GetNumberOfPolys() > 0  # the same mesh in both files
        assert stl.stat().st_size == 84 + 50 * facets
