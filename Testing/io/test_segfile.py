"""Slicer segmentation files: format fields, read-back with slicerio, exact geometry, mapping."""

from __future__ import annotations

import warnings

import nrrd
import numpy as np
import pytest
import slicerio
from conftest import SAMPLE_DATA

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.scans import read_volume, write_volume
from KneeSegLogic.io.segfile import (
    LPS_TO_RAS,
    read_labels,
    read_segmentation,
    write_segmentation,
)
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_LABEL, TISSUES

# NRRD stores spacing x direction as one vector per axis; splitting it back into spacing and
# direction costs at most a few float64 ulps.
GEOMETRY_ATOL = 1e-12


def assert_same_geometry(a: Volume, b: Volume, atol: float = GEOMETRY_ATOL) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


def test_round_trip_oblique_exact(tmp_path, oblique_labels):
    path = write_segmentation(oblique_labels, tmp_path / "s.seg.nrrd")
    labelmap, segments = read_segmentation(path)
    assert labelmap.array.dtype == np.uint8
    np.testing.assert_array_equal(labelmap.array, oblique_labels.array)
    assert_same_geometry(labelmap, oblique_labels)
    # Only structures present become segments, in table order, each named and coloured from it.
    assert [s.label_value for s in segments] == [1, 5, 6, 9]
    for segment in segments:
        tissue = BY_LABEL[segment.label_value]
        assert (segment.id, segment.name, segment.layer) == (tissue.key, tissue.name, 0)
        np.testing.assert_allclose(segment.color, tissue.color, atol=1e-6)
        assert segment.terminology == tissue.terminology
        assert segment.extent == (0, 20, 0, 16, 0, 12)  # whole grid: the layer is shared
    assert [p.name for p in tmp_path.iterdir()] == ["s.seg.nrrd"]  # no temporary left behind


def test_header_fields_follow_slicer_format(tmp_path, oblique_labels):
    path = write_segmentation(oblique_labels, tmp_path / "s.seg.nrrd", include_empty=True, extra={"KneeSeg.model": "test 1.0"})
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["encoding"] == "gzip"
    assert header["kinds"] == ["domain"] * 3
    assert list(header["sizes"]) == [21, 17, 13]
    # NRRD space directions: one row per axis (i, j, k) = direction column x spacing.
    np.testing.assert_allclose(header["space directions"], (oblique_labels.direction * oblique_labels.spacing).T, atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(header["space origin"], oblique_labels.origin, atol=GEOMETRY_ATOL)
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["KneeSeg.model"] == "test 1.0"

    parameters = {p.split("|")[0]: p.split("|") for p in header["Segmentation_ConversionParameters"].split("&")}
    assert all(len(p) == 3 for p in parameters.values())
    geometry = parameters["Reference image geometry"][1].split(";")
    assert geometry[-1] == "" and len(geometry) == 23  # 16 matrix numbers, 6 extent, trailing ';'
    ijk_to_ras = np.array([float(v) for v in geometry[:16]]).reshape(4, 4)
    np.testing.assert_array_equal(ijk_to_ras, LPS_TO_RAS @ oblique_labels.index_to_physical())
    assert [int(v) for v in geometry[16:22]] == [0, 20, 0, 16, 0, 12]

    for index, tissue in enumerate(TISSUES):  # include_empty: every tissue, in table order
        assert header[f"Segment{index}_ID"] == tissue.key
        assert header[f"Segment{index}_Name"] == tissue.name
        assert header[f"Segment{index}_LabelValue"] == str(tissue.label)
        assert header[f"Segment{index}_Layer"] == "0"
        assert header[f"Segment{index}_Extent"] == "0 20 0 16 0 12"
        assert [float(c) for c in header[f"Segment{index}_Color"].split()] == pytest.approx(tissue.color, abs=1e-6)
        assert header[f"Segment{index}_Tags"] == f"TerminologyEntry:{tissue.terminology}|"
    assert "Segment10_ID" not in header


def test_slicerio_reads_names_colours_labels_terminology(tmp_path, oblique_labels):
    path = write_segmentation(oblique_labels, tmp_path / "s.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(segmentation) == ["Femoral cartilage", "Femur", "Tibia", "Lateral meniscus"]
    np.testing.assert_array_equal(segmentation["ijkToLPS"], oblique_labels.index_to_physical())
    for segment in segmentation["segments"]:
        tissue = BY_LABEL[segment["labelValue"]]
        assert segment["color"] == pytest.approx(tissue.color, abs=1e-6)
        terminology = segment["terminology"]
        assert terminology["category"] == list(tissue.category)
        assert terminology["type"] == list(tissue.type)
        if tissue.region is not None:
            assert terminology["anatomicRegion"] == list(tissue.region)
        # slicerio's voxels are (i, j, k); ours are (k, j, i).
        mask = slicerio.segment_mask(segmentation, segment)
        np.testing.assert_array_equal(np.transpose(mask), oblique_labels.array == tissue.label)


def test_read_labels_maps_segments_edited_in_slicer(tmp_path, oblique_labels):
    """Segments renumbered, renamed or relabelled (as after editing) map back to KneeSeg labels."""
    tissue = BY_LABEL[1]
    generic = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~~^^~^^"
    voxels = np.zeros((21, 17, 13), np.uint8)
    voxels[1:4, 1:4, 1:4] = 7  # KneeSeg terminology, foreign name and label value -> 1
    voxels[5:8, 1:4, 1:4] = 2  # generic terminology, name "medial meniscus" -> 10
    voxels[9:12, 1:4, 1:4] = 3  # no terminology, Slicer's default name -> by label value 3
    voxels[13:15, 1:4, 1:4] = 4  # a structure KneeSeg does not know -> ignored
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": oblique_labels.index_to_physical(),
        "segments": [
            {"id": "Segment_1", "name": "cartilage (edited)", "labelValue": 7, "color": [1, 0, 0],
             "terminology": slicerio.segmentation.terminology_entry_from_string(tissue.terminology)},
            {"id": "Segment_2", "name": "Medial  MENISCUS", "labelValue": 2, "color": [0, 1, 0],
             "terminology": slicerio.segmentation.terminology_entry_from_string(generic)},
            {"id": "Segment_3", "name": "Segment_3", "labelValue": 3, "color": [0, 0, 1]},
            {"id": "Segment_4", "name": "bone marrow lesion", "labelValue": 4, "color": [1, 1, 0],
             "terminology": slicerio.segmentation.terminology_entry_from_string(generic)},
        ],
    }
    path = tmp_path / "edited.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    with pytest.warns(UserWarning, match="bone marrow lesion"):
        labels = read_labels(path)
    expected = np.zeros_like(voxels)
    expected[voxels == 7], expected[voxels == 2], expected[voxels == 3] = 1, 10, 3
    np.testing.assert_array_equal(labels.array, np.transpose(expected))
    assert_same_geometry(labels, oblique_labels)


def test_read_labels_collapses_overlapping_layers(tmp_path, oblique_labels):
    voxels = np.zeros((2, 21, 17, 13), np.uint8)  # (layer, i, j, k), as Slicer writes overlaps
    voxels[0, 2:10, 2:10, 2:10] = 5
    voxels[1, 8:14, 2:10, 2:10] = 1
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": oblique_labels.index_to_physical(),
        "segments": [
            {"id": "femur", "name": "Femur", "labelValue": 5, "layer": 0},
            {"id": "cart", "name": "Femoral cartilage", "labelValue": 1, "layer": 1},
        ],
    }
    path = tmp_path / "layers.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    labelmap, segments = read_segmentation(path)
    assert labelmap.array.shape == (13, 17, 21, 2) and [s.layer for s in segments] == [0, 1]
    with pytest.warns(UserWarning, match="overlaps others in 128 voxels"):  # 2 x 8 x 8 shared
        labels = read_labels(path)
    expected = np.where(voxels[1] == 1, 1, voxels[0])
    np.testing.assert_array_equal(labels.array, np.transpose(expected))


def test_read_labels_plain_volume_and_reference_grid(tmp_path, oblique_labels):
    write_volume(oblique_labels, tmp_path / "labels.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = read_labels(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(labels.array, oblique_labels.array)
    assert labels.array.dtype == np.uint8

    # A segmentation on a cropped grid (as Slicer may save one) comes back on the scan's grid.
    crop = oblique_labels.array[2:11, 3:9, 4:12]
    origin = oblique_labels.index_to_physical() @ np.array([4, 3, 2, 1.0])
    cropped = Volume(crop, oblique_labels.spacing, tuple(origin[:3]), oblique_labels.direction)
    write_segmentation(cropped, tmp_path / "crop.seg.nrrd")
    restored = read_labels(tmp_path / "crop.seg.nrrd", reference=oblique_labels)
    expected = np.zeros_like(oblique_labels.array)
    expected[2:11, 3:9, 4:12] = crop
    np.testing.assert_array_equal(restored.array, expected)
    assert_same_geometry(restored, oblique_labels)


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.full((4, 4, 4), 11, np.uint8), r"label values \[11\] that are not KneeSeg labels"),
        (np.full((4, 4, 4), 1.5, np.float32), "non-integer"),
    ],
)
def test_read_labels_refuses_non_kneeseg_labels(tmp_path, array, problem):
    path = write_volume(Volume(array, (1, 1, 1)), tmp_path / "bad.nrrd")
    with pytest.raises(InputError, match=f"bad.nrrd: .*{problem}"):
        read_labels(path)


def test_read_errors_name_the_file(tmp_path, oblique_labels):
    with pytest.raises(InputError, match="missing.seg.nrrd: no such file"):
        read_labels(tmp_path / "missing.seg.nrrd")
    not_nrrd = tmp_path / "text.seg.nrrd"
    not_nrrd.write_text("hello")
    with pytest.raises(InputError, match="text.seg.nrrd"):
        read_segmentation(not_nrrd)
    empty = write_segmentation(oblique_labels.with_array(np.zeros_like(oblique_labels.array)), tmp_path / "empty.seg.nrrd")
    with pytest.raises(InputError, match="empty.seg.nrrd: segmentation holds no voxels"):
        read_labels(empty)


def test_write_refuses_unknown_labels_and_writes_nothing(tmp_path, oblique_labels):
    with pytest.raises(ValueError, match=r"\[42\]"):
        write_segmentation(oblique_labels.with_array(np.full(oblique_labels.array.shape, 42, np.uint8)), tmp_path / "x.seg.nrrd")
    with pytest.raises(ValueError, match="reserved"):
        write_segmentation(oblique_labels, tmp_path / "x.seg.nrrd", extra={"Segment0_Name": "x"})
    assert list(tmp_path.iterdir()) == []


def test_bundled_label_map_round_trips(tmp_path):
    """The real pymskt label map (oblique sagittal grid): every structure, exact voxels."""
    labels = read_volume(SAMPLE_DATA / "knee_labels.nrrd")
    path = write_segmentation(labels, tmp_path / "knee.seg.nrrd")
    back = read_labels(path, reference=labels)
    np.testing.assert_array_equal(back.array, labels.array)
    assert_same_geometry(back, labels)
    assert [s.name for s in read_segmentation(path)[1]] == [t.name for t in TISSUES]
