"""NIfTI and DICOM SEG label maps (``--format``), checked by reading them back with nibabel and highdicom."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rotation, write_dicom_series

from KneeSegLogic.io.dicom import read_dicom_folder
from KneeSegLogic.io.export import write_dicom_seg, write_nifti_labels
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_LABEL


def _labels_on(grid: Volume) -> np.ndarray:
    """Femoral cartilage (1), femur (5) and medial meniscus (10) in known voxels of ``grid``."""
    labels = np.zeros(grid.array.shape[:3], np.uint8)
    labels[1, 2:4, 1:3] = 1
    labels[2:4, 0:2, 3:5] = 5
    labels[3, 4, 4] = 10
    return labels


def test_nifti_label_map_reads_back_with_nibabel_in_ras(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    grid = Volume(
        np.zeros((4, 5, 6), np.uint8), (0.7, 0.6, 3.0), origin=(-20.0, 35.5, 12.25), direction=rotation((0, 0, 1), 30)
    )
    labels = grid.with_array(_labels_on(grid))
    path = write_nifti_labels(labels, tmp_path / "segmentation.nii.gz")
    image = nibabel.load(path)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.uint8 and data.shape == (6, 5, 4)  # NIfTI is i, j, k
    np.testing.assert_array_equal(data.transpose(2, 1, 0), labels.array)
    # Voxel (i, j, k) = (1, 2, 1) in RAS is LPS with x and y negated.
    lps = labels.index_to_physical() @ np.array([1, 2, 1, 1.0])
    ras = image.affine @ np.array([1, 2, 1, 1.0])
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1], atol=1e-4)


@pytest.mark.parametrize("echoes", [(10.0,), (10.0, 20.0, 30.0)])
def test_dicom_seg_references_the_source_series_and_reads_back(tmp_path, echoes):
    hd = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    pixels = np.random.default_rng(1).integers(0, 1000, (4, 5, 6, len(echoes))).astype(np.int16)
    series = tmp_path / "series"
    files = write_dicom_series(series, pixels, echoes, orientation=rotation((1, 0, 0), 20))
    frame_of_reference = pydicom.uid.generate_uid()
    for file in files:  # as every MR scanner writes them (the test series helper leaves them out)
        dataset = pydicom.dcmread(file)
        dataset.FrameOfReferenceUID, dataset.PatientSex = frame_of_reference, "F"
        dataset.save_as(file)
    grid = read_dicom_folder(series)
    labels = Volume(_labels_on(grid), grid.spacing, grid.origin, grid.direction)
    path = write_dicom_seg(labels, series, tmp_path / "segmentation.dcm", model_name="test-model 1.0")
    seg = hd.seg.segread(path)
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    first_echo = {uid for uid, d in sources.items() if float(d.EchoTime) == min(echoes)}
    referenced = {
        item.ReferencedSOPInstanceUID
        for series_item in seg.ReferencedSeriesSequence
        for item in series_item.ReferencedInstanceSequence
    }
    assert referenced == first_echo  # one source image per slice: the first echo's
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Femoral cartilage", "Femur", "Medial meniscus"]
    assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == BY_LABEL[10].type[1]
    # Each segment's mask, placed by the source images it refers to, is the label map's.
    for number, value in enumerate((1, 5, 10), start=1):
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[
                next(uid for uid in first_echo if int(sources[uid].InstanceNumber) == k + 1) for k in range(4)
            ],
            segment_numbers=[number],
            skip_overlap_checks=True,
        )[..., 0]
        np.testing.assert_array_equal(mask, labels.array == value)
