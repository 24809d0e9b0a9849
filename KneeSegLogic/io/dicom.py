"""DICOM folders: one series, single- or multi-echo, with exact geometry.

Slices are ordered by their position along the slice normal (the cross product of the row and
column direction cosines), never by file name or InstanceNumber: scanners number multi-echo
series echo-fastest, slice-fastest or by acquisition, and file names carry no order at all.
Headers are read with pydicom (echo times, positions); voxels and geometry with SimpleITK's
series reader on the sorted file list, so the geometry is ITK's, as Slicer computes it.

Only the files in the folder itself are read, never its sub-folders (a parent folder would
otherwise gather every series below it). A folder holding several series is refused with the
list of their SeriesInstanceUIDs; ``FOLDER::UID`` chooses one.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from KneeSegLogic.errors import CancelledError, InputError, one_line
from KneeSegLogic.io.checks import _first_line, check_echo_times, check_memory
from KneeSegLogic.io.outputs import SERIES_SEPARATOR
from KneeSegLogic.io.volume import Volume

# Slice spacing may wobble by this fraction (rounding in headers) before we call it irregular.
SPACING_TOLERANCE = 0.01

# We check slice spacing ourselves (below, with a clear error); ITK would only print warnings.
sitk.ProcessObject.SetGlobalWarningDisplay(False)


@dataclass(frozen=True)
class _Slice:
    path: Path
    series_uid: str
    echo_time_ms: float | None
    echo_number: int | None
    position: np.ndarray
    orientation: tuple[float, ...]
    rows: int
    columns: int
    description: str = ""

    @property
    def normal(self) -> np.ndarray:
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, column)


def _number(path: Path, header: pydicom.Dataset, keyword: str, count: int | None = None) -> list[float] | None:
    """A numeric DICOM attribute as a list of floats (None when absent); a malformed one is refused."""
    element = header.get(keyword)
    if element in (None, ""):
        return None
    values = list(element) if isinstance(element, (list, tuple, pydicom.multival.MultiValue)) else [element]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(path, f"{keyword} {element!r} is not numeric") from None
    if count is not None and len(numbers) != count:
        raise InputError(path, f"{keyword} holds {len(numbers)} values; {count} expected")
    if not all(np.isfinite(numbers)):
        raise InputError(path, f"{keyword} {numbers} is not finite")
    return numbers


def _check_pixel_data(path: Path, header: pydicom.Dataset) -> None:
    """Refuse a slice whose pixel data are shorter than its header declares (truncated file,
    changed BitsAllocated) or that is a multi-frame object; pixel data are not loaded."""
    frames = header.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise InputError(
            path,
            f"is a multi-frame DICOM object ({int(frames)} frames, {header.get('Modality', '?')}); "
            "KneeSeg reads MR series stored one slice per file",
        )
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputError(path, f"is a colour DICOM image ({samples} samples per pixel); a greyscale MR image is needed")
    element = header.get_item("PixelData")
    if element is None:
        raise InputError(path, "DICOM image has no pixel data")
    transfer = getattr(header.file_meta, "TransferSyntaxUID", None) if hasattr(header, "file_meta") else None
    # pydicom gives a RawDataElement (declared length known) or a DataElement (deferred value).
    declared = getattr(element, "length", None)
    undefined = getattr(element, "is_undefined_length", False) or declared == 0xFFFFFFFF
    if undefined or (transfer is not None and transfer.is_compressed):
        return  # encapsulated (compressed) frames: the decoder checks them
    try:
        bits = int(header.BitsAllocated)
        needed = int(header.Rows) * int(header.Columns) * bits // 8
    except (AttributeError, TypeError, ValueError):
        raise InputError(path, "DICOM image lacks readable Rows, Columns or BitsAllocated") from None
    # Bytes from the start of the pixel data to the end of the file (pixel data come last;
    # trailing padding only makes this lenient).
    start = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
    if start is None:
        return
    present = max(0, path.stat().st_size - int(start))
    if declared is not None:
        present = min(present, int(declared))
    if bits not in (8, 16, 32) or present < needed:
        raise InputError(
            path,
            f"pixel data hold {present:,} bytes where Rows x Columns x BitsAllocated ({bits}) need {needed:,}; "
            "the file is truncated or its header is wrong",
        )


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_headers(folder: Path) -> list[_Slice]:
    """Headers of the DICOM images in ``folder`` itself (not its sub-folders)."""
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            # Pixel data are deferred: their length and offset are read, not their bytes. pydicom
            # warns on stderr of what it tolerates (implicit VR where explicit was declared): the
            # checks below decide, and the user gets one line, not a library's warning as well.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(path, defer_size=256)
        except CancelledError:  # SIGTERM/Ctrl-C raised inside pydicom: a stop, not a corrupt file
            raise
        except Exception as error:  # pydicom raises many kinds for a corrupt file
            if _has_dicom_preamble(path):  # a DICOM file cut short or damaged: never skip it silently
                raise InputError(path, f"DICOM file is truncated or corrupt ({one_line(error, 200)})") from None
            continue  # not a DICOM file (README, DICOMDIR index, thumbnails)
        if "PixelData" not in header:
            if "ImagePositionPatient" in header or "Rows" in header:
                raise InputError(path, "DICOM image has no pixel data (the file is truncated)")
            continue  # a DICOM file that is not an image (DICOMDIR, structured report)
        _check_pixel_data(path, header)
        position = _number(path, header, "ImagePositionPatient", 3)
        orientation = _number(path, header, "ImageOrientationPatient", 6)
        if position is None or orientation is None:
            raise InputError(
                path, "DICOM image has no ImagePositionPatient/ImageOrientationPatient; cannot place it in space"
            )
        echo_time = _number(path, header, "EchoTime")
        echo_number = _number(path, header, "EchoNumbers")
        if echo_time is not None and len(echo_time) != 1:
            raise InputError(path, f"EchoTime holds {len(echo_time)} values; one expected")
        if echo_number is not None and len(echo_number) != 1:
            raise InputError(path, f"EchoNumbers holds {len(echo_number)} values; one echo per file expected")
        slices.append(
            _Slice(
                path=path,
                series_uid=str(header.get("SeriesInstanceUID", "")),
                echo_time_ms=None if echo_time is None else echo_time[0],
                echo_number=None if echo_number is None else int(echo_number[0]),
                position=np.asarray(position),
                orientation=tuple(round(v, 4) for v in orientation),
                rows=int(header.Rows),
                columns=int(header.Columns),
                description=str(header.get("SeriesDescription", "")),
            )
        )
    return slices


def _describe_series(slices: list[_Slice]) -> str:
    by_series: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        by_series[s.series_uid].append(s)
    return "; ".join(
        f"{uid} ({len(group)} files{', ' + repr(group[0].description) if group[0].description else ''})"
        for uid, group in sorted(by_series.items())
    )


def _check_one_acquisition(folder: Path, slices: list[_Slice]) -> None:
    """Refuse folders that mix series, unless the series are the echoes of one acquisition.

    Some scanners store each echo of a multi-echo acquisition as its own series; those series
    share orientation, matrix and slice positions and differ only in echo time.
    """
    by_series: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        by_series[s.series_uid].append(s)
    if len(by_series) == 1:
        return

    def signature(group: list[_Slice]) -> tuple:
        positions = sorted(tuple(np.round(s.position, 2)) for s in group)
        return group[0].orientation, group[0].rows, group[0].columns, tuple(positions)

    signatures = {signature(group) for group in by_series.values()}
    echo_sets = [{s.echo_time_ms for s in group} for group in by_series.values()]
    one_echo_each = all(len(e) == 1 and None not in e for e in echo_sets)
    distinct_echoes = len({next(iter(e)) for e in echo_sets if e}) == len(by_series)
    if len(signatures) == 1 and one_echo_each and distinct_echoes:
        return
    raise InputError(
        folder,
        f"folder mixes {len(by_series)} DICOM series: {_describe_series(slices)}; "
        f"choose one as {folder}{SERIES_SEPARATOR}SERIES_UID or put each series in its own folder",
    )


def _group_by_echo(folder: Path, slices: list[_Slice]) -> list[tuple[float | None, list[_Slice]]]:
    """Group slices into echoes, ordered by echo time (or echo number where times are absent)."""
    groups: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in slices:
        key = (
            round(s.echo_time_ms, 3) if s.echo_time_ms is not None else None,
            s.echo_number if s.echo_time_ms is None else None,
        )
        groups[key].append(s)
    if len(groups) > 1 and any(key[0] is None for key in groups):
        raise InputError(folder, "multi-echo series without EchoTime in every file; echo times are missing")
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] or 0.0, item[0][1] or 0))
    return [(key[0], group) for key, group in ordered]


def _sort_along_normal(folder: Path, group: list[_Slice]) -> list[_Slice]:
    orientations = {s.orientation for s in group}
    if len(orientations) > 1:
        raise InputError(folder, f"slices have {len(orientations)} different orientations; folder mixes series")
    if len({(s.rows, s.columns) for s in group}) > 1:
        raise InputError(folder, "slices have different matrix sizes; folder mixes series")
    normal = group[0].normal
    ordered = sorted(group, key=lambda s: float(s.position @ normal))
    depths = np.array([s.position @ normal for s in ordered])
    if len(ordered) < 2:
        raise InputError(folder, "holds a single slice per echo (a 2D image); a 3D scan is needed")
    steps = np.diff(depths)
    if np.any(steps < 1e-3):
        raise InputError(folder, "two slices share one position within an echo; folder mixes series or echoes")
    typical = float(np.median(steps))
    if np.ptp(steps) > SPACING_TOLERANCE * typical + 1e-3:
        odd = int(np.argmax(np.abs(steps - typical)))
        raise InputError(
            folder,
            f"slice spacing is irregular ({steps.min():.3f} to {steps.max():.3f} mm; {steps[odd]:.3f} mm between "
            f"{ordered[odd].path.name} and {ordered[odd + 1].path.name}): a slice is missing or misplaced",
        )
    return ordered


def _read_series(files: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute()


def _no_images(folder: Path) -> InputError:
    """The error for a folder without DICOM images, naming sub-folders that may hold them."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        shown = ", ".join(subfolders[:5]) + (f" and {len(subfolders) - 5} more" if len(subfolders) > 5 else "")
        return InputError(
            folder, f"folder holds no DICOM images itself (sub-folders are not searched: {shown}); give a series folder"
        )
    return InputError(folder, "folder holds no DICOM images")


def series_in_folder(folder: str | Path) -> dict[str, int]:
    """SeriesInstanceUID -> number of image files, for the DICOM images in ``folder`` itself."""
    counts: dict[str, int] = defaultdict(int)
    for s in _read_headers(Path(folder)):
        counts[s.series_uid] += 1
    return dict(counts)


def read_dicom_folder(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read a folder holding one DICOM series (files in the folder itself; sub-folders are not read).

    A single-echo series gives a 3D volume; a multi-echo series gives a 4D volume
    ``array[k, j, i, echo]`` with ``echo_times_ms`` in increasing order. Voxels are float32 after
    the rescale slope/intercept. ``series_uid`` chooses one series in a folder holding several
    (the command line spells it ``FOLDER::SeriesInstanceUID``).

    Raises
    ------
    InputError
        No DICOM image; several series and none chosen (they are listed); a chosen series that
        is absent; a slice truncated, multi-frame or with malformed geometry (the file is named);
        irregular spacing; echoes that do not match.
    """
    folder = Path(folder)
    slices = _read_headers(folder)
    if not slices:
        raise _no_images(folder)
    if series_uid is not None:
        chosen = [s for s in slices if s.series_uid == series_uid.strip()]
        if not chosen:
            raise InputError(folder, f"holds no series {series_uid}; it holds {_describe_series(slices)}")
        slices = chosen
    _check_one_acquisition(folder, slices)
    echoes = _group_by_echo(folder, slices)
    ordered = [_sort_along_normal(folder, group) for _, group in echoes]
    counts = {len(group) for group in ordered}
    if len(counts) > 1:
        raise InputError(folder, f"echoes have different numbers of slices ({sorted(counts)}); series incomplete")
    first = ordered[0]
    for group in ordered[1:]:
        if not np.allclose([s.position for s in group], [s.position for s in first], atol=0.01):
            raise InputError(folder, "echoes are not on the same slice positions")
    check_memory(folder, (first[0].columns, first[0].rows, len(first)), len(ordered))
    try:
        images = [_read_series([s.path for s in group]) for group in ordered]
    except RuntimeError as error:
        raise InputError(folder, f"DICOM pixel data cannot be read ({one_line(_first_line(error), 200)})") from None
    if len(images) == 1:
        return Volume.from_sitk(images[0])
    # _group_by_echo refused echoes without EchoTime; a None left here fails check_echo_times.
    echo_times = [float("nan") if t is None else t for t, _ in echoes]
    check_echo_times(echo_times, folder)
    return Volume.from_sitk(sitk.Compose(images), echo_times)
