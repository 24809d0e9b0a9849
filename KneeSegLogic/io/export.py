"""Label maps in the formats used outside Slicer: NIfTI (research tools) and DICOM SEG (PACS).

``--format nifti`` writes the label map as NIfTI-1 (``segmentation.nii.gz``; values are the
label values of :data:`KneeSegLogic.tissues.TISSUES`, the affine in RAS mm as NIfTI requires,
converted from KneeSeg's LPS by ITK). ``--format dicom-seg`` writes a DICOM Segmentation object
(``segmentation.dcm``, binary segments with SNOMED-CT terminology) that references the source
MR series, so a PACS or viewer shows it over the images it was made from; it needs DICOM input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from KneeSegLogic import __version__
from KneeSegLogic.errors import KneeSegError
from KneeSegLogic.io.outputs import SERIES_SEPARATOR, atomic_file, input_location
from KneeSegLogic.io.scans import write_volume
from KneeSegLogic.io.volume import Volume
from KneeSegLogic.tissues import BY_LABEL, Code

#: The ``--format`` choices (besides Slicer's .seg.nrrd, always written).
FORMATS = ("nifti", "dicom-seg")

# Positions of a source image and of its slice on the label grid may differ by rounding in
# the DICOM decimal strings (16 characters): a tenth of a voxel is far beyond that.
POSITION_TOLERANCE_VOXELS = 0.1

# Patient and study attributes a SEG copies from its source (DICOM type 2: present, may be
# empty). Anonymised series often lack them; an empty value keeps the SEG valid.
TYPE_2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def write_nifti_labels(labels: Volume, path: str | Path) -> Path:
    """Write the label map as NIfTI (uint8 label values; RAS affine from the LPS geometry)."""
    path = Path(path)
    with atomic_file(path) as temporary:
        write_volume(labels.with_array(labels.array.astype(np.uint8)), temporary)
    return path


def _coded(code: Code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])


def source_images(source: str | Path, labels: Volume) -> list:
    """The source DICOM images of ``source``, one per slice ``k`` of ``labels``, in slice order.

    ``source`` is the DICOM input as the scan was named: a series folder, or ``FOLDER::UID`` for
    one series of a folder holding several (the folder itself is read, not its sub-folders, as
    :func:`KneeSegLogic.io.dicom.read_dicom_folder` does).

    A multi-echo series holds one image per echo at each position: the image of the shortest
    echo time is referenced (all echoes share the geometry). Raises ``KneeSegError`` when the
    images do not lie on the label grid.
    """
    import pydicom

    folder = input_location(source)
    text = str(source)
    series_uid = text.split(SERIES_SEPARATOR, 1)[1] if SERIES_SEPARATOR in text else None
    to_index = np.linalg.inv(labels.index_to_physical())
    by_slice: dict[int, pydicom.Dataset] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue  # not a DICOM file
        if "ImagePositionPatient" not in dataset or "PixelData" not in dataset:
            continue
        if series_uid is not None and dataset.get("SeriesInstanceUID") != series_uid:
            continue
        for keyword in TYPE_2_COPIED:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
        i, j, k = (to_index @ np.append(np.asarray(dataset.ImagePositionPatient, float), 1.0))[:3]
        slice_index = int(round(k))
        if max(abs(i), abs(j), abs(k - slice_index)) > POSITION_TOLERANCE_VOXELS:
            raise KneeSegError(f"{path}: DICOM image does not lie on the segmentation grid")
        previous = by_slice.get(slice_index)
        if previous is None or float(getattr(dataset, "EchoTime", 0) or 0) < float(
            getattr(previous, "EchoTime", 0) or 0
        ):
            by_slice[slice_index] = dataset
    depth = labels.array.shape[0]
    if sorted(by_slice) != list(range(depth)):
        raise KneeSegError(f"{folder}: DICOM images cover {len(by_slice)} of the {depth} slices of the segmentation")
    return [by_slice[k] for k in range(depth)]


def write_dicom_seg(
    labels: Volume,
    source_folder: str | Path,
    path: str | Path,
    model_name: str = "KneeSeg",
    structures: Sequence[int] | None = None,
) -> Path:
    """Write the label map as a DICOM SEG (binary) referencing the source series in ``source_folder``.

    Segment numbers run 1..n over the structures present (DICOM requires them consecutive);
    each segment carries its tissue's name, SNOMED-CT category/type, anatomic region and side,
    and its display colour. ``structures`` limits the segments to those label values.
    """
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = source_images(source_folder, labels)
    present = [int(v) for v in np.unique(labels.array) if v in BY_LABEL]
    if structures is not None:
        present = [v for v in present if v in structures]
    if not present:
        raise KneeSegError("no structure to write as DICOM SEG: the segmentation is empty")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="KneeSeg", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, value in enumerate(present, start=1):
        tissue = BY_LABEL[value]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=tissue.name,
            segmented_property_category=_coded(tissue.category),
            segmented_property_type=_coded(tissue.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_coded(tissue.region)] if tissue.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in tissue.color)),
        )
        if tissue.region_modifier:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
                CodedConcept(
                    value=tissue.region_modifier[1],
                    scheme_designator=tissue.region_modifier[0],
                    meaning=tissue.region_modifier[2],
                )
            ]
        descriptions.append(description)
    # One frame per source image, holding segment numbers (0 = background): highdicom splits
    # it into binary frames per segment and drops the empty ones.
    numbering = np.zeros(max(BY_LABEL) + 1, np.uint8)
    numbering[present] = np.arange(1, len(present) + 1)
    frames = numbering[labels.array.astype(np.intp)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="KneeSeg",
        manufacturer_model_name=model_name[:64],
        software_versions=__version__,
        device_serial_number="0",
        series_description="KneeSeg segmentation",
    )
    path = Path(path)
    with atomic_file(path) as temporary:
        seg.save_as(temporary)
    return path
