"""Reading and writing scans: NIfTI, NRRD, MHA files and DICOM folders to and from a Volume.

Every scan read is checked (:mod:`KneeSegLogic.io.checks`); every file written is written
atomically, with its geometry and, for multi-echo volumes, its echo times in the header.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from KneeSegLogic.errors import InputError, one_line
from KneeSegLogic.io.checks import (
    _first_line,
    check_echo_times,
    check_memory,
    validate_volume,
)
from KneeSegLogic.io.headers import check_image_header
from KneeSegLogic.io.outputs import SERIES_SEPARATOR, atomic_file
from KneeSegLogic.io.volume import Volume

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def read_volume(path: str | Path, echo_times_ms: Sequence[float] | None = None) -> Volume:
    """Read a scan and check that it can be right.

    Parameters
    ----------
    path : str or Path
        NIfTI, NRRD or MHA file, or a folder of DICOM files (one series; multi-echo series are
        split by echo, see :func:`KneeSegLogic.io.dicom.read_dicom_folder`). A folder holding
        several series is read as ``FOLDER::SeriesInstanceUID``, naming the one to take.
    echo_times_ms : sequence of float, optional
        Echo times for a 4D NIfTI/NRRD file whose header does not hold them. Where the header
        (or DICOM) holds echo times too, they must agree.

    Raises
    ------
    InputError
        Missing, unreadable, truncated or not a regular file; a 2D, complex or colour image; an
        empty volume, NaN/inf voxels, spacing that is zero, NaN or not a scanner's; echo times
        missing, not increasing or contradicting the header; a folder mixing series; a volume too
        large for memory.
    """
    text = str(path)
    series = None
    if SERIES_SEPARATOR in text:
        text, series = text.split(SERIES_SEPARATOR, 1)
    path = Path(text)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        from KneeSegLogic.io.dicom import read_dicom_folder

        volume = read_dicom_folder(path, series)
        headers = volume.echo_times_ms
        given = None if echo_times_ms is None else list(echo_times_ms)
        if given is not None and (
            len(given) != (len(headers) if headers is not None else 1)
            or (headers is not None and not np.allclose(given, headers, atol=1e-3))
        ):
            raise InputError(
                path,
                f"echo times given ({given} ms) differ from the DICOM headers "
                + (f"({list(headers)} ms)" if headers is not None else "(a single-echo series)"),
            )
    elif series is not None:
        raise InputError(path, f"is a file; {SERIES_SEPARATOR}{series} chooses a series in a DICOM folder")
    else:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            # A FIFO or device would block the reader in C code, out of reach of signals.
            raise InputError(path, "is not a regular file (a pipe, device or socket); give an image file")
        volume = _read_image_file(path, echo_times_ms)
    validate_volume(volume, path)
    return volume


def _read_image_file(path: Path, echo_times_ms: Sequence[float] | None) -> Volume:
    if not _is_image_file(path):
        raise InputError(path, f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder")
    # What ITK would repair or misread silently (zero or NaN spacing read as 1 mm, truncated
    # NIfTI zero-filled, colour or complex pixels) is refused from the header first.
    check_image_header(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        check_memory(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
        if reader.GetPixelID() in _COMPLEX_PIXELS:
            raise InputError(path, "holds complex-valued voxels; a magnitude image is needed")
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(path, f"cannot be read as an image ({one_line(_first_line(error), 200)})") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        non_finite = _nifti_non_finite_count(path)
        if non_finite:
            raise InputError(path, f"volume contains {non_finite} NaN or infinite voxels")
    dimension = image.GetDimension()
    if dimension == 2 or (dimension == 3 and image.GetSize()[2] == 1):
        raise InputError(path, f"is a 2D image (size {image.GetSize()}); a 3D scan is needed")
    if dimension == 4:
        # A 4D file (echoes as the 4th dimension): split into 3D echo images on one grid.
        size = list(image.GetSize())
        echoes = [
            sitk.Extract(image, size[:3] + [0], [0, 0, 0, e], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
            for e in range(size[3])
        ]
        image = sitk.Compose(echoes)
    if dimension > 4:
        raise InputError(path, f"has {dimension} dimensions; 3D or 4D (multi-echo) expected")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1 or dimension == 4:
        stored = _header_echo_times(reader)
        if (
            echo_times_ms is not None
            and stored is not None
            and (len(stored) != len(echo_times_ms) or not np.allclose(echo_times_ms, stored, atol=1e-3))
        ):
            raise InputError(
                path, f"echo times given ({list(echo_times_ms)} ms) differ from the file's header ({stored} ms)"
            )
        if echo_times_ms is None:
            echo_times_ms = stored
        if echo_times_ms is None:
            raise InputError(
                path,
                (
                    f"holds {components} echoes but no echo times; "
                    if not (image.GetPixelID() == sitk.sitkVectorUInt8 and components in (3, 4))
                    else f"holds {components} values per voxel (echoes, or the channels of a colour image) but "
                    "no echo times; for a multi-echo scan "
                )
                + "give them with --echo-times (ms, comma-separated)",
            )
        if len(echo_times_ms) != components:
            raise InputError(path, f"holds {components} echoes but {len(echo_times_ms)} echo times were given")
        check_echo_times(echo_times_ms, path)
        return Volume.from_sitk(image, echo_times_ms)
    if echo_times_ms is not None and len(echo_times_ms) > 1:
        raise InputError(path, f"is a single 3D volume but {len(echo_times_ms)} echo times were given")
    return Volume.from_sitk(image)


def _nifti_non_finite_count(path: Path) -> int:
    """NaN/inf voxels in a NIfTI file, counted from the file itself.

    ITK 5's NIfTI reader (SimpleITK 2.x) silently turns NaN and +-inf into 0, so the check in
    :func:`validate_volume` never sees them (fixed in ITK 6, InsightSoftwareConsortium/ITK#6683).
    """
    import nibabel

    try:
        image: Any = nibabel.load(str(path))
        if image.get_data_dtype().kind not in "fc":
            return 0
        return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))
    except (OSError, EOFError, ValueError) as error:  # nibabel's words for a truncated or corrupt file
        raise InputError(path, f"cannot be read as an image (NIfTI: {one_line(error, 200)})") from None


_COMPLEX_PIXELS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


# Header keys holding echo times: ours, and Slicer's MultiVolume convention (frame labels with
# EchoTime as the identifying DICOM tag), so multi-echo volumes saved by Slicer load directly.
ECHO_TIMES_KEY = "echo_times_ms"

MULTIVOLUME_LABELS_KEY = "MultiVolume.FrameLabels"

MULTIVOLUME_TAG_KEY = "MultiVolume.FrameIdentifyingDICOMTagName"


def _header_echo_times(reader: sitk.ImageFileReader) -> list[float] | None:
    keys = set(reader.GetMetaDataKeys())
    if ECHO_TIMES_KEY in keys:
        text = reader.GetMetaData(ECHO_TIMES_KEY)
    elif MULTIVOLUME_LABELS_KEY in keys and reader.GetMetaData(
        MULTIVOLUME_TAG_KEY if MULTIVOLUME_TAG_KEY in keys else MULTIVOLUME_LABELS_KEY
    ).strip() in ("EchoTime", reader.GetMetaData(MULTIVOLUME_LABELS_KEY)):
        text = reader.GetMetaData(MULTIVOLUME_LABELS_KEY)
    else:
        return None
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        return None


def write_volume(
    volume: Volume,
    path: str | Path,
    compress: bool = True,
    metadata: Mapping[str, str] | None = None,
    compression_level: int = -1,
) -> Path:
    """Write NRRD (``.nrrd``, gzip-compressed), NIfTI (``.nii``/``.nii.gz``) or MHA, atomically.

    The file is written beside its final name and renamed, so a crash never leaves a half file.
    Multi-echo volumes are written as vector images (one component per echo); their echo times go
    into the NRRD/MHA header as ``echo_times_ms``. ``metadata`` adds header key/value fields
    (NRRD/MHA); ``compression_level`` is the gzip level (-1: ITK's default).
    """
    path = Path(path)
    if not _is_image_file(path):
        raise ValueError(f"{path}: unsupported output type; use one of {', '.join(IMAGE_SUFFIXES)}")
    image = volume.to_sitk()
    if volume.echo_times_ms is not None:
        image.SetMetaData(ECHO_TIMES_KEY, " ".join(f"{t:g}" for t in volume.echo_times_ms))
        image.SetMetaData(MULTIVOLUME_LABELS_KEY, ",".join(f"{t:g}" for t in volume.echo_times_ms))
        image.SetMetaData(MULTIVOLUME_TAG_KEY, "EchoTime")
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    with atomic_file(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress, compressionLevel=compression_level)
    return path
