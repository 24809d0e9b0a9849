"""Slicer segmentation files (``.seg.nrrd``): write KneeSeg label maps, read them back.

A ``.seg.nrrd`` file is a gzip NRRD labelmap in LPS space with key/value fields Slicer reads
into an editable segmentation node (format: Slicer's ``vtkMRMLSegmentationStorageNode``):

- ``Segmentation_MasterRepresentation`` ("Binary labelmap"),
  ``Segmentation_ContainedRepresentationNames``, ``Segmentation_ReferenceImageExtentOffset`` and
  ``Segmentation_ConversionParameters`` (here the reference image geometry: the 4x4 IJK-to-RAS
  matrix row-major and the extent, ``;``-separated, as Slicer serialises it);
- per segment ``SegmentN_ID``, ``_Name``, ``_Color`` (RGB in [0, 1]), ``_LabelValue``,
  ``_Layer`` (index along the 4th axis of a multi-layer file), ``_Extent`` and ``_Tags``
  (``TerminologyEntry:<Slicer terminology string>|``).

All KneeSeg structures are disjoint, so they share one layer and each segment's label value is
its :data:`~KneeSegLogic.tissues.TISSUES` label. Every segment's extent is the whole grid:
Slicer crops a shared layer to the extent of the first segment it reads in that layer, so a
per-segment bounding box there would cut the other segments off.

The NRRD structure is written and parsed by ``slicerio`` (on ``pynrrd``); this module supplies
the geometry (from :class:`~KneeSegLogic.volume.Volume`, exact to float64 rounding) and the
tissue table.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import nrrd
import numpy as np
import slicerio
from slicerio.segmentation import terminology_entry_to_string

from KneeSegLogic.errors import InputError, one_line
from KneeSegLogic.io.outputs import atomic_file
from KneeSegLogic.io.scans import read_volume
from KneeSegLogic.io.volume import Volume, resample_to_grid
from KneeSegLogic.tissues import TISSUES, Tissue

SEGMENTATION_SUFFIX = ".seg.nrrd"

BINARY_LABELMAP = "Binary labelmap"

REFERENCE_GEOMETRY = "Reference image geometry"

# Slicer's world coordinates are RAS; NRRD space and Volume geometry are LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a Slicer segmentation file.

    Attributes
    ----------
    id, name : str
        Segment ID (unique in the file) and the name Slicer shows.
    color : tuple of 3 floats
        RGB in [0, 1].
    label_value : int
        Voxel value of the segment in its layer.
    layer : int
        Layer (4th-axis index) holding the segment; 0 in single-layer files.
    extent : tuple of 6 ints
        ``(i0, i1, j0, j1, k0, k1)``, inclusive voxel index ranges in the file's grid.
    terminology : str or None
        Slicer ``TerminologyEntry`` string.
    tags : mapping
        Other segment tags (``Segmentation.Status`` included), as stored.
    """

    id: str
    name: str
    color: tuple[float, float, float]
    label_value: int
    layer: int = 0
    extent: tuple[int, ...] = ()
    terminology: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


def is_segmentation_file(path: str | Path) -> bool:
    """True for a NRRD file whose header holds Slicer segmentation fields."""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nhdr")) or not path.is_file():
        return False
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        return True  # by name: read_segmentation then says what is wrong with a broken one
    try:
        header = nrrd.read_header(str(path))
    except (nrrd.NRRDError, OSError, UnicodeDecodeError, ValueError, StopIteration):  # StopIteration: empty file
        return False
    return "Segmentation_MasterRepresentation" in header or "Segment0_ID" in header


def _reference_geometry(labels: Volume) -> str:
    """Slicer's serialised image geometry: IJK-to-RAS row-major, then the extent."""
    ijk_to_ras = LPS_TO_RAS @ labels.index_to_physical()
    i, j, k = labels.size
    numbers = [repr(float(v)) for v in ijk_to_ras.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(f"{n};" for n in numbers)


def _check_extra(extra: Mapping[str, str]) -> dict[str, str]:
    reserved = ("Segment", "Segmentation_", "space", "sizes", "kinds", "type", "encoding", "dimension", "endian")
    fields = {}
    for key, value in extra.items():
        text = str(value)
        if key.startswith(reserved) or ":=" in key or any(c in key + text for c in "\n\r"):
            raise ValueError(f"extra header field {key!r} is reserved or not a single NRRD key/value line")
        fields[key] = text
    return fields


def write_segmentation(
    labels: Volume,
    path: str | Path,
    tissues: Iterable[Tissue] = TISSUES,
    extra: Mapping[str, str] | None = None,
    include_empty: bool = False,
) -> Path:
    """Write a label map as a Slicer segmentation file, atomically.

    Parameters
    ----------
    labels : Volume
        3D label map ``array[k, j, i]`` holding 0 (background) and label values of ``tissues``.
    path : str or Path
        Output file, normally ``*.seg.nrrd``.
    tissues : iterable of Tissue
        The structures that may appear (name, colour, terminology per label value).
    extra : mapping of str to str, optional
        Additional header fields (provenance, e.g. ``{"KneeSeg.model": "knee-2p5d 1.0"}``);
        Slicer ignores keys it does not know.
    include_empty : bool
        Also write segments for listed tissues with no voxels (so a user can paint them in
        Slicer); by default only structures present in ``labels`` become segments.

    Returns
    -------
    Path
        ``path``. The file is written beside it and renamed, so no half file is ever seen.
    """
    path = Path(path)
    if labels.array.ndim != 3:
        raise ValueError(f"a segmentation needs a 3D label map, got an array of shape {labels.array.shape}")
    table = {t.label: t for t in tissues}
    present = np.unique(labels.array)
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in table)
    if unknown or not np.all(np.equal(np.mod(present, 1), 0)):
        raise ValueError(f"label values {unknown or list(present)} are not in the tissue table")
    voxels = labels.array.astype(np.uint8 if max(table, default=0) < 256 else np.uint16)
    i, j, k = labels.size
    full_extent = [0, i - 1, 0, j - 1, 0, k - 1]
    segments = [
        {
            "id": tissue.key,
            "name": tissue.name,
            "color": [float(c) for c in tissue.color],
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
            "labelValue": tissue.label,
            "layer": 0,
            "extent": full_extent,
            "tags": {"TerminologyEntry": tissue.terminology},
        }
        for tissue in table.values()
        if include_empty or tissue.label in present
    ]
    segmentation = {
        "voxels": np.transpose(voxels),  # array[k, j, i] -> NRRD (i, j, k) in Fortran order
        "ijkToLPS": labels.index_to_physical(),
        "encoding": "gzip",
        "masterRepresentation": BINARY_LABELMAP,
        "containedRepresentationNames": [BINARY_LABELMAP],
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [
            {
                "name": REFERENCE_GEOMETRY,
                "value": _reference_geometry(labels),
                "description": "Geometry (IJK to RAS, extent) of the labelmap: the grid of the segmented scan.",
            },
            {
                "name": "Oversampling factor",
                "value": "1",
                "description": "Labelmaps made from other representations use the reference grid unchanged.",
            },
        ],
        **_check_extra(extra or {}),
        "segments": segments,
    }
    with atomic_file(path) as temporary:
        # Level 6: within a few percent of level 9 in size for label maps, several times faster.
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=6)
    return path


def _volume_from_ijk_to_lps(array: np.ndarray, ijk_to_lps: np.ndarray) -> Volume:
    axes = np.asarray(ijk_to_lps, dtype=float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Volume(array, tuple(spacing), tuple(np.asarray(ijk_to_lps)[:3, 3]), axes / spacing)


def read_segmentation(path: str | Path) -> tuple[Volume, list[SegmentInfo]]:
    """Read a Slicer segmentation file.

    Returns
    -------
    labelmap : Volume
        ``array[k, j, i]`` for a single-layer file; ``array[k, j, i, layer]`` when segments
        overlap and Slicer stored them in several layers (``echo_times_ms`` is None then).
    segments : list of SegmentInfo
        In file order (``Segment0`` first).

    Raises
    ------
    InputError
        Missing, empty, truncated or unreadable file, a NRRD file that is not 3D/4D, or a zero or
        NaN voxel size.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty (0 bytes)")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    # pynrrd raises StopIteration on a header cut short, EOFError/zlib errors on cut data.
    except (OSError, EOFError, StopIteration, nrrd.NRRDError, ValueError, KeyError, IndexError, zlib.error) as error:
        raise InputError(
            path, f"cannot be read as a Slicer segmentation ({one_line(error, 200) or type(error).__name__})"
        ) from None
    spacing = np.linalg.norm(np.asarray(segmentation["ijkToLPS"], dtype=float)[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            path, f"space directions have lengths {spacing.round(6).tolist()} mm; a zero or NaN voxel size is unusable"
        )
    voxels = segmentation["voxels"]
    if voxels.ndim == 3:
        array = np.ascontiguousarray(np.transpose(voxels))
    elif voxels.ndim == 4:  # (layer, i, j, k) -> (k, j, i, layer)
        array = np.ascontiguousarray(np.transpose(voxels, (3, 2, 1, 0)))
    else:
        raise InputError(path, f"segmentation has {voxels.ndim} dimensions; 3 or 4 expected")
    segments = [
        SegmentInfo(
            id=s["id"],
            name=s.get("name", s["id"]),
            color=tuple(s.get("color", (0.5, 0.5, 0.5))),
            label_value=int(s.get("labelValue", index + 1)),
            layer=int(s.get("layer", 0)),
            extent=tuple(s.get("extent", ())),
            terminology=terminology_entry_to_string(s["terminology"]) if "terminology" in s else None,
            tags={**s.get("tags", {}), **({"Segmentation.Status": s["status"]} if "status" in s else {})},
        )
        for index, s in enumerate(segmentation["segments"])
    ]
    return _volume_from_ijk_to_lps(array, segmentation["ijkToLPS"]), segments


def _codes(terminology: str) -> tuple[tuple[str, str], ...]:
    """(scheme, value) of category, type, anatomic region and region modifier.

    Code meanings and context names are ignored (Slicer versions word them differently), and
    so is the type modifier (left/right knee does not change the structure).
    """
    parts = terminology.split("~") + [""] * 7

    def code(item: str) -> tuple[str, str]:
        scheme, value = (item.split("^") + ["", ""])[:2]
        return (scheme, value)

    return code(parts[1]), code(parts[2]), code(parts[5]), code(parts[6])


def _normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


# Names Slicer and label-map importers give segments that carry no meaning of their own.
_DEFAULT_NAME = re.compile(r"^((segment|label)[ _-]*\d+)?$", re.IGNORECASE)


def match_tissue(segment: SegmentInfo, tissues: Iterable[Tissue] = TISSUES) -> Tissue | None:
    """The KneeSeg structure a segment holds, or None.

    Matched by terminology codes, else by name (case and ``_`` ignored), else — only for a
    segment with a default name such as ``Segment_3`` — by its label value. A named segment
    KneeSeg does not know (``"bone marrow lesion"``) is not taken for the structure that happens
    to share its label value.
    """
    tissues = tuple(tissues)
    if segment.terminology:
        for tissue in tissues:
            if _codes(tissue.terminology) == _codes(segment.terminology):
                return tissue
    for tissue in tissues:
        if _normalised(segment.name) in (_normalised(tissue.name), _normalised(tissue.key)):
            return tissue
    if _DEFAULT_NAME.match(segment.name.strip()):
        return next((t for t in tissues if t.label == segment.label_value), None)
    return None


def read_labels(path: str | Path, reference: Volume | None = None) -> Volume:
    """A KneeSeg label map from a segmentation file or a label volume.

    Parameters
    ----------
    path : str or Path
        A Slicer segmentation (``.seg.nrrd``, or any NRRD with segmentation fields; segments
        are mapped to KneeSeg label values by :func:`match_tissue`), or a label volume
        (NRRD/NIfTI/MHA) already holding KneeSeg label values.
    reference : Volume, optional
        A scan the labels must overlay: labels on another grid (e.g. a segmentation Slicer
        cropped) are resampled onto it by nearest neighbour.

    Returns
    -------
    Volume
        3D ``uint8`` label map with values 0 and :data:`~KneeSegLogic.tissues.TISSUES` labels.

    Raises
    ------
    InputError
        Missing or unreadable file, not 3D, non-integer or unknown label values, or no
        KneeSeg structure in it.
    """
    path = Path(path)
    if is_segmentation_file(path):
        labels = _labels_from_segmentation(path)
    else:
        volume = read_volume(path)
        if volume.array.ndim != 3:
            raise InputError(path, f"is not a 3D label map (array shape {volume.array.shape})")
        values = np.unique(volume.array)
        if not np.all(np.equal(np.mod(values, 1), 0)):
            raise InputError(path, "holds non-integer values; a label map is needed")
        known = {t.label for t in TISSUES}
        unknown = sorted(int(v) for v in values if v != 0 and int(v) not in known)
        if unknown:
            raise InputError(path, f"holds label values {unknown} that are not KneeSeg labels {sorted(known)}")
        labels = volume.with_array(volume.array.astype(np.uint8))
    if reference is not None and not labels.same_grid(reference, atol=1e-6):
        labels = resample_to_grid(labels, reference, is_label=True)
    return labels


def _labels_from_segmentation(path: Path) -> Volume:
    labelmap, segments = read_segmentation(path)
    layers = labelmap.array if labelmap.array.ndim == 4 else labelmap.array[..., None]
    labels = np.zeros(layers.shape[:3], np.uint8)
    ignored = []
    for segment in segments:
        tissue = match_tissue(segment)
        if tissue is None:
            ignored.append(segment.name)
            continue
        if segment.layer >= layers.shape[3]:
            raise InputError(path, f"segment {segment.name!r} is in layer {segment.layer} of {layers.shape[3]}")
        mask = layers[..., segment.layer] == segment.label_value
        overlap = int(np.count_nonzero(mask & (labels != 0) & (labels != tissue.label)))
        if overlap:
            warnings.warn(
                f"{path}: segment {segment.name!r} overlaps others in {overlap} voxels; it is kept there", stacklevel=2
            )
        labels[mask] = tissue.label
    if ignored:
        warnings.warn(f"{path}: segments {ignored} match no KneeSeg structure and were ignored", stacklevel=2)
    if not labels.any():
        raise InputError(path, "segmentation holds no voxels of any KneeSeg structure")
    return Volume(labels, labelmap.spacing, labelmap.origin, labelmap.direction)
