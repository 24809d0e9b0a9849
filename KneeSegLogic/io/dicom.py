"""DICOM folders: one series, single- or multi-echo, with exact geometry.

Slices are ordered by their position along the slice normal (the cross product of the row and
column direction cosines), never by file name or InstanceNumber: scanners number multi-echo
series echo-fastest, slice-fastest or by acquisition, and file names carry no order at all.
Headers are read with pydicom (echo times, positions); voxels and geometry with SimpleITK's
series reader on the sorted file list, so the geometry is ITK's, as Slicer computes it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from KneeSegLogic.errors import InputError
from KneeSegLogic.io.checks import check_echo_times, check_memory
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

    @property
    def normal(self) -> np.ndarray:
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, column)


def _read_headers(folder: Path) -> list[_Slice]:
    slices = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue  # not a DICOM file (README, DICOMDIR index, thumbnails)
        if "PixelData" not in header and getattr(header, "Rows", None) is None:
            continue
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            raise InputError(
                path, "DICOM image has no ImagePositionPatient/ImageOrientationPatient; cannot place it in space"
            )
        echo_time = header.get("EchoTime")
        echo_number = header.get("EchoNumbers")
        slices.append(
            _Slice(
                path=path,
                series_uid=str(header.get("SeriesInstanceUID", "")),
                echo_time_ms=None if echo_time in (None, "") else float(echo_time),
                echo_number=None if echo_number in (None, "") else int(echo_number),
                position=np.asarray([float(v) for v in header.ImagePositionPatient]),
                orientation=tuple(round(float(v), 4) for v in header.ImageOrientationPatient),
                rows=int(header.Rows),
                columns=int(header.Columns),
            )
        )
    return slices


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
        f"folder mixes {len(by_series)} DICOM series ({', '.join(sorted(u[-12:] for u in by_series))}); "
        "put each series in its own folder",
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
    if np.ptp(steps) > SPACING_TOLERANCE * np.mean(steps) + 1e-3:
        raise InputError(folder, f"slice spacing is irregular ({steps.min():.3f} to {steps.max():.3f} mm)")
    return ordered


def _read_series(files: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute()


def read_dicom_folder(folder: str | Path) -> Volume:
    """Read a folder holding one DICOM series.

    A single-echo series gives a 3D volume; a multi-echo series gives a 4D volume
    ``array[k, j, i, echo]`` with ``echo_times_ms`` in increasing order. Voxels are float32 after
    the rescale slope/intercept.
    """
    folder = Path(folder)
    slices = _read_headers(folder)
    if not slices:
        raise InputError(folder, "folder holds no DICOM images")
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
        raise InputError(folder, f"DICOM pixel data cannot be read ({str(error).strip().splitlines()[-1]})") from None
    if len(images) == 1:
        return Volume.from_sitk(images[0])
    echo_times = [t for t, _ in echoes]
    check_echo_times(echo_times, folder)
    return Volume.from_sitk(sitk.Compose(images), echo_times)
