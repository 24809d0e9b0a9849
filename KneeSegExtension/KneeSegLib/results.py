"""Reading the engine's output folder: ``results.json``, surface files, and what the module derives from them.

The folder is the contract between the engine and the module (see the engine's ``outputs``
module): ``segmentation.seg.nrrd``, ``uncertainty.nrrd``, ``t2.nrrd``, ``regions.csv``,
``surfaces/<structure>.vtp`` (LPS, mm) and ``results.json``. Sections of ``results.json`` a
command does not produce are absent; every reader here returns an empty answer for them.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

RESULTS_FILE = "results.json"
SEGMENTATION_FILE = "segmentation.seg.nrrd"
UNCERTAINTY_FILE = "uncertainty.nrrd"
T2_FILE = "t2.nrrd"
REGIONS_TABLE_FILE = "regions.csv"
SURFACES_FOLDER = "surfaces"
# Relaxation maps (ms) by kind: `kneeseg t2` and `segment` write t2.nrrd, `kneeseg relax --kind K` K.nrrd.
RELAXATION_FILES = {"t2": T2_FILE, "t1rho": "t1rho.nrrd", "t2star": "t2star.nrrd"}

# Node attribute names carrying provenance; a saved scene keeps them with the node.
ATTRIBUTE_PREFIX = "KneeSeg."


def readResults(folder: str | Path) -> dict[str, Any]:
    """``results.json`` of an output folder ({} when the command wrote none)."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def relaxationMapIn(*folders: Path | None) -> tuple[Path, str] | None:
    """``(folder, kind)`` of the first of ``folders`` holding a relaxation map (list the folder of the
    command run last first: it wins), or ``None``. ``kind`` is a key of :data:`RELAXATION_FILES`."""
    for folder in folders:
        if folder is None:
            continue
        for kind, fileName in RELAXATION_FILES.items():
            if (Path(folder) / fileName).is_file():
                return Path(folder), kind
    return None


def relaxationSummary(results: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """What ``results.json`` says about a relaxation map: quantity, unit, model, times and what they are."""
    section = results.get(kind) or {}
    return {key: section.get(key) for key in ("quantity", "unit", "model", "times", "echo_times_ms")}


def structureVolumes(results: Mapping[str, Any]) -> dict[str, float]:
    """Volume of each structure in mm^3 (``results["volumes_mm3"]``), keyed by structure key."""
    volumes = results.get("volumes_mm3") or {}
    return {str(key): float(value) for key, value in volumes.items() if _number(value) is not None}


def structureUncertainty(results: Mapping[str, Any]) -> dict[str, float]:
    """Mean normalised entropy (0-1) of each structure (``results["uncertainty"]["per_structure"]``)."""
    values = (results.get("uncertainty") or {}).get("per_structure") or {}
    return {str(key): float(value) for key, value in values.items() if _number(value) is not None}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def writeVolumesTable(results: Mapping[str, Any], names: Mapping[str, str], path: str | Path) -> Path | None:
    """CSV with one row per structure: name, key, volume (mm^3) and mean uncertainty, for a table node.

    ``names`` maps structure keys to the names shown (the segment names). ``None`` when the
    results hold no volumes.
    """
    volumes = structureVolumes(results)
    if not volumes:
        return None
    uncertainty = structureUncertainty(results)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["Structure", "Key", "Volume (mm3)", "Volume (cm3)", "Mean uncertainty"])
        for key, volume in volumes.items():
            mean = uncertainty.get(key)
            writer.writerow([names.get(key, key), key, f"{volume:.1f}", f"{volume / 1000:.3f}",
                             "" if mean is None else f"{mean:.4f}"])
    return path


@dataclass(frozen=True)
class UncertainSlice:
    """A slice worth a human look: ``index`` along IJK axis ``axis`` (2 = K, the scan's own slices).

    ``positionLps`` is the slice centre in LPS millimetres when the engine gives it.
    """

    axis: int
    index: int
    score: float | None = None
    meanUncertainty: float | None = None
    structures: tuple[str, ...] = ()
    positionLps: tuple[float, float, float] | None = None

    @property
    def label(self) -> str:
        text = f"slice {'IJK'[self.axis]} = {self.index}"
        if self.meanUncertainty is not None:
            text += f"   mean uncertainty {self.meanUncertainty:.3f}"
        if self.structures:
            text += "   (" + ", ".join(s.replace("_", " ") for s in self.structures) + ")"
        return text


_AXES = {"i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}


def uncertainSlices(results: Mapping[str, Any]) -> list[UncertainSlice]:
    """The engine's ``most_uncertain_slices`` (in ``results["uncertainty"]``), most uncertain first.

    Entries are objects with ``slice_index`` and ``axis`` (``"i"``, ``"j"`` or ``"k"``), and
    optionally ``score``, ``mean_uncertainty``, ``structures`` and ``position_lps_mm``; a bare
    number is a slice index along K.
    """
    entries = (results.get("uncertainty") or {}).get("most_uncertain_slices") or []
    slices = []
    for entry in entries:
        if _number(entry) is not None:
            slices.append(UncertainSlice(2, int(entry)))
        elif isinstance(entry, Mapping):
            index = _number(entry.get("slice_index", entry.get("index")))
            if index is None:
                continue
            position = entry.get("position_lps_mm")
            valid = isinstance(position, (list, tuple)) and len(position) == 3 and all(_number(v) is not None for v in position)
            slices.append(UncertainSlice(
                axis=_AXES.get(str(entry.get("axis", "k")).lower(), 2),
                index=int(index),
                score=_number(entry.get("score")),
                meanUncertainty=_number(entry.get("mean_uncertainty")),
                structures=tuple(str(s) for s in entry.get("structures") or ()),
                positionLps=tuple(float(v) for v in position) if valid else None,
            ))
    return slices


def sliceCentreIJK(dimensions: tuple[int, int, int], axis: int, index: int) -> tuple[float, float, float]:
    """IJK coordinates of the centre of slice ``index`` along ``axis`` of a volume of ``dimensions``."""
    if not 0 <= index < dimensions[axis]:
        raise ValueError(f"slice {index} is outside 0-{dimensions[axis] - 1} along {'IJK'[axis]}")
    centre = [(n - 1) / 2 for n in dimensions]
    centre[axis] = float(index)
    return (centre[0], centre[1], centre[2])


def surfaceFiles(folder: str | Path, results: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``{structure key: surface file}`` of an output folder, VTP preferred over STL."""
    folder = Path(folder)
    files: dict[str, Path] = {}
    structures = ((results or {}).get("surfaces") or {}).get("structures") or {}
    for key, entry in structures.items():
        for suffix in ("vtp", "stl"):
            relative = (entry.get("files") or {}).get(suffix)
            if relative and (folder / relative).is_file():
                files[key] = folder / relative
                break
    for suffix in ("stl", "vtp"):  # files the results do not list: vtp written last wins
        for path in sorted((folder / SURFACES_FOLDER).glob(f"*.{suffix}")):
            if path.stem not in structures:
                files[path.stem] = path
    return files


def provenanceAttributes(results: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, str]:
    """Node attributes recording how a result was made (model, device, packages, parameters)."""
    model = results.get("model") or {}
    if not isinstance(model, Mapping):
        model = {"id": str(model)}
    device = results.get("device")
    attributes = {
        "ModelId": model.get("id"),
        "ModelVersion": model.get("version"),
        "ModelSha256": model.get("sha256"),
        "Device": json.dumps(device) if isinstance(device, (Mapping, list)) else device,
        "Packages": json.dumps(results.get("packages"), sort_keys=True) if results.get("packages") else None,
        "EngineCommand": results.get("command"),
        "SchemaVersion": results.get("schema_version"),
        "Created": results.get("created"),
        "Parameters": json.dumps(dict(parameters), sort_keys=True, default=str),
        "Warnings": json.dumps(results.get("warnings")) if results.get("warnings") else None,
    }
    return {ATTRIBUTE_PREFIX + name: str(value) for name, value in attributes.items() if value not in (None, "")}


def caseName(nodeName: str) -> str:
    """A file-name-safe case name from a node name (letters, digits, ``-``, ``_``, ``.``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeName.strip()).strip("._")
    return name or "case"


def trainingCasePaths(folder: str | Path, case: str) -> tuple[Path, Path]:
    """Where a corrected case goes in a training folder: ``images/<case>.nrrd``, ``labels/<case>.seg.nrrd``.

    That is the image/label pair layout ``kneeseg train`` reads for fine-tuning.
    """
    folder = Path(folder)
    return folder / "images" / f"{case}.nrrd", folder / "labels" / f"{case}.seg.nrrd"


def replacementWarning(madeByKneeSeg: bool, edited: bool, segmentCount: int) -> str:
    """Why writing a new result into an existing segmentation needs the user's yes, or ``""``.

    ``"edited"``: KneeSeg made it and it was changed since (a correction would be lost);
    ``"foreign"``: KneeSeg did not make it and it holds segments (somebody's work, never called
    "edited"). An empty segmentation, or an unchanged KneeSeg result, is written into silently.
    """
    if segmentCount == 0:
        return ""
    if not madeByKneeSeg:
        return "foreign"
    return "edited" if edited else ""
